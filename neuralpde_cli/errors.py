"""The one exception type that reaches the user as a single clean line."""


class UserError(Exception):
    """Bad input (config value, file, combination): printed as one line, exit status 2."""
