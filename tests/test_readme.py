"""README's Python example runs as written (docs that drift from the code are worse than none)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_example_runs(tmp_path: Path, monkeypatch) -> None:
    """Run from a scratch folder that sees the checkout's tests/ (the example's data file), so
    that what the examples write (outputs/api/…) lands there, not in the checkout."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no Python example"
    (tmp_path / "tests").symlink_to(README.parent / "tests")
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
