"""Observations of an SDE: the data schema ``simulate`` writes and ``calibrate`` reads.

Two formats hold the same fields (documented in README § Data sets):

* **CSV** (comma-separated, or ``;``/tab where the header has those and no comma): a header
  naming the columns, then one observation per line. ``time`` (required),
  one column per state variable (any other names, in order), ``path`` (optional: an integer
  id, for several independent paths in one file). Columns may come in any order.
* **.npz**: arrays ``time`` (N,), ``state`` (N, d) (or (N,) for d = 1), optionally ``path``
  (N,) integers and ``state_names`` (d,) strings.

Times must increase strictly within each path; the time step may vary (irregular sampling).
Rows stay in file order, so a row index always points back to the line a user can find.
Every problem with a file is one UserError naming the file, the line (CSV) or row (npz) and
the column.
"""

from __future__ import annotations

import csv
import io
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from neuralpde_cli.errors import UserError
from neuralpde_cli.run.atomic import atomic_write

FORMATS = (".csv", ".npz")
NPZ_FIELDS = ("time", "state", "path", "state_names")
#: how the time column is read: numbers in years, or dates by a day count (auto: numbers as
#: years, dates by calendar days)
TIME_UNITS = ("auto", "years", "calendar", "trading")
MISSING_POLICIES = ("skip", "refuse")
#: header names taken as the time column when there is no 'time' (case-insensitive)
TIME_NAMES = ("time", "date", "datetime", "timestamp", "t", "day", "dates")
#: cells read as a missing value (case-insensitive; '.' is FRED's)
MISSING_TOKENS = frozenset({"", "na", "nan", "n/a", "#n/a", "null", "none", ".", "-"})
CALENDAR_DAYS, TRADING_DAYS = 365.25, 252
_DECIMAL_COMMA = re.compile(r"^([-+]?\d+),(\d+)$")


@dataclass
class DataConfig:
    """The ``data`` group: which file, and how to read its time and state columns."""

    #: a CSV or .npz in the data schema (``data=PATH`` stands for ``data.path=PATH``)
    path: Optional[str] = None
    #: auto | years | calendar | trading: a numeric time column is in years; dates become
    #: years by calendar days / 365.25 (auto, calendar) or business days / 252 (trading)
    time: str = "auto"
    #: a strftime format for dates that are not ISO 8601 (e.g. '%d/%m/%Y'); null: ISO
    date_format: Optional[str] = None
    #: the state columns by name, in order; empty: every column but the time and 'path'
    columns: list[str] = field(default_factory=list)
    #: skip: drop an observation with a missing value (NA, empty, '.'), so its neighbours'
    #: transition spans the gap; refuse: stop at it with its file, line and column
    missing: str = "skip"
    #: the state coordinates the columns hold, in order (e.g. [0]: Heston's log S alone, its
    #: variance latent and filtered out); empty: every coordinate
    observed: list[int] = field(default_factory=list)
    #: a column to draw beside the filtered latent coordinate, in its units (e.g. VIX²/10⁴
    #: for Heston's V); read from the same file, matched by time, never fitted
    proxy: Optional[str] = None

    def check(self) -> None:
        if self.time not in TIME_UNITS:
            raise UserError(f"data.time={self.time}: choose one of {list(TIME_UNITS)}")
        if self.missing not in MISSING_POLICIES:
            raise UserError(f"data.missing={self.missing}: choose one of {list(MISSING_POLICIES)}")


def default_state_names(dim: int) -> list[str]:
    """``x`` in 1-D, ``x1 … xd`` otherwise."""
    return ["x"] if dim == 1 else [f"x{i + 1}" for i in range(dim)]


@dataclass
class Transitions:
    """Consecutive pairs within each path (numpy): start x0 (n, d), end x1 (n, d), start time
    t0 (n,), step dt (n,) > 0; ``path`` (n,) their path id and ``row`` (n,) the index of x1's
    observation in :class:`Observations` (to point back at the file)."""

    x0: np.ndarray
    x1: np.ndarray
    t0: np.ndarray
    dt: np.ndarray
    path: np.ndarray | None = None
    row: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.dt.shape[0])


@dataclass
class Observations:
    """time (N,), state (N, d), path (N,) int, in file order; ``source`` names the file read."""

    time: np.ndarray
    state: np.ndarray
    path: np.ndarray
    state_names: list[str] = field(default_factory=list)
    source: str = ""
    #: CSV line number of each row (blank lines are skipped), None for other sources
    line: np.ndarray | None = None
    #: the observation dates when the file gave dates (datetime64), else None
    dates: np.ndarray | None = None
    #: how the time column was read, in words (the run's first log line says it)
    time_note: str = ""
    #: CSV lines skipped for a missing value (data.missing=skip)
    skipped_lines: list[int] = field(default_factory=list)
    #: the time column's name in the file (messages point at it)
    time_column: str = "time"

    def __post_init__(self) -> None:
        self.time = np.asarray(self.time, dtype=float).reshape(-1)
        self.state = np.asarray(self.state, dtype=float).reshape(self.time.shape[0], -1)
        self.path = np.asarray(self.path, dtype=np.int64).reshape(-1)
        if self.path.shape != self.time.shape:
            raise ValueError(f"path has {self.path.shape[0]} entries, time {self.time.shape[0]}")
        if not self.state_names:
            self.state_names = default_state_names(self.dim)

    @property
    def dim(self) -> int:
        return int(self.state.shape[1])

    @property
    def n_paths(self) -> int:
        return int(np.unique(self.path).shape[0])

    def where(self, row: int) -> str:
        """How a user finds observation ``row``: "data.csv line 7" or "data.npz row 5"."""
        place = f"line {int(self.line[row])}" if self.line is not None else f"row {row}"
        return f"{self.source} {place}" if self.source else place

    def transitions(self) -> Transitions:
        """Every consecutive pair within a path (paths in order of their id, rows in file order)."""
        order = np.argsort(self.path, kind="stable")
        same = self.path[order][1:] == self.path[order][:-1]
        start, end = order[:-1][same], order[1:][same]
        return Transitions(x0=self.state[start], x1=self.state[end], t0=self.time[start],
                           dt=self.time[end] - self.time[start], path=self.path[end], row=end)


# --- reading ----------------------------------------------------------------------------------
def read_observations(path: str | Path, dim: int | None = None,
                      options: DataConfig | None = None) -> Observations:
    """The observations in a CSV or .npz file, checked (see the module docstring); ``dim``: the
    state dimension the SDE needs (None: whatever the file has); ``options``: how to read the
    time and state columns (:class:`DataConfig`)."""
    options = options or DataConfig()
    options.check()
    file = Path(str(path)).expanduser()
    name = str(path)
    if not file.exists():
        raise UserError(f"data file {name}: no such file")
    if file.is_dir():
        raise UserError(f"data file {name} is a folder; give a .csv or .npz file")
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"data file {name}: unknown format {file.suffix or '(no suffix)'!r}; "
                        f"use one of {list(FORMATS)} (README § Data sets)")
    time, state, paths, names, lines, extra = (_read_csv if suffix == ".csv" else _read_npz)(
        file, name, options)
    obs = Observations(time, state, paths, names, name, lines, extra.get("dates"),
                       extra.get("time_note", ""), extra.get("skipped_lines", []),
                       extra.get("time_column", "time"))
    _check(obs, dim)
    return obs


def _read_csv(file: Path, name: str, options: DataConfig) -> tuple[Any, ...]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {name} is not UTF-8 text (byte {exc.start}); is it a CSV?") from None
    except OSError as exc:
        raise UserError(f"data file {name} cannot be read: {exc.strerror or exc}") from None
    # the delimiter: a comma, or a semicolon or tab where the header has those and no comma
    # (spreadsheets in many locales write ';')
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = next((d for d in (";", "\t") if d in first and "," not in first), ",")
    try:
        lines = [(i + 1, row) for i, row in enumerate(csv.reader(io.StringIO(text),
                                                                 delimiter=delimiter))
                 if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise UserError(f"data file {name} is not valid CSV: {exc}") from None
    if not lines:
        raise UserError(f"data file {name} is empty; it needs a header line "
                        "'time,<state columns>[,path]' and observations")
    header_line, header = lines[0]
    header = [h.strip() for h in header]
    for j, h in enumerate(header):
        if not h:
            raise UserError(f"data file {name} line {header_line}: column {j + 1} has no name "
                            f"(header {','.join(header)!r})")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise UserError(f"data file {name} line {header_line}: column {dupes[0]!r} appears twice")
    time_name = _time_column(header, name, delimiter)
    rows = lines[1:]
    if not rows:
        raise UserError(f"data file {name} has a header but no observations")
    width = len(header)
    for line, row in rows:
        if len(row) != width:
            what = "more" if len(row) > width else "fewer"
            raise UserError(f"data file {name} line {line}: {len(row)} fields, {what} than the "
                            f"{width} columns of the header ({','.join(header)})")
    col = {h: j for j, h in enumerate(header)}
    if options.columns:
        unknown = [c for c in options.columns if c not in col or c in (time_name, "path")]
        if unknown:
            raise UserError(f"data.columns={list(options.columns)}: {unknown[0]!r} is not a state "
                            f"column of {name}; its header is {header}")
        states = list(options.columns)
    else:
        states = [h for h in header if h not in (time_name, "path")]
    if not states:
        raise UserError(f"data file {name}: no state column; the header {header} needs one column "
                        f"per state variable beside {time_name!r} (and the optional 'path')")
    cells = [[c.strip() for c in row] for _, row in rows]
    if delimiter != ",":  # a ';' file from a spreadsheet writes decimal commas: 1,5 is 1.5
        cells = [[_DECIMAL_COMMA.sub(r"\1.\2", c) for c in row] for row in cells]
    used = [col[h] for h in states] + ([col["path"]] if "path" in col else [])
    # a missing value: refused where it is, or its observation skipped (the transition then
    # spans the gap with its own Δt)
    missing = [i for i, row in enumerate(cells)
               if any(row[j].lower() in MISSING_TOKENS for j in used + [col[time_name]])]
    if missing and options.missing == "refuse":
        i = missing[0]
        j = next(j for j in used + [col[time_name]] if cells[i][j].lower() in MISSING_TOKENS)
        raise UserError(f"data file {name} line {rows[i][0]}, column {header[j]}: a missing value "
                        f"({cells[i][j] or 'an empty field'!s}); data.missing=skip drops such "
                        "observations (each transition then spans the gap)")
    keep = sorted(set(range(len(rows))) - set(missing))
    if not keep:
        raise UserError(f"data file {name}: every observation has a missing value")
    skipped = [rows[i][0] for i in missing]
    rows, cells = [rows[i] for i in keep], [cells[i] for i in keep]
    line_of = np.array([line for line, _ in rows])
    where = lambda i: f"data file {name} line {int(line_of[i])}"  # noqa: E731
    try:
        values = np.array([[row[j] for j in used] for row in cells], dtype=float)
    except ValueError:
        for i, row in enumerate(cells):
            for j in used:
                try:
                    float(row[j])
                except ValueError:
                    hint = ""
                    if all(_not_number(r[j]) for r in cells) and not options.columns:
                        hint = (f"; a column of labels? choose the state columns with "
                                f"data.columns=[{','.join(h for h in states if h != header[j])}]")
                    raise UserError(f"{where(i)}, column {header[j]}: {row[j]!r} is not a "
                                    f"number{hint}") from None
        raise  # pragma: no cover - numpy and float() agree on what a number is
    paths = _path_ids(values[:, -1], where, "column path") if "path" in col \
        else np.zeros(len(rows), dtype=np.int64)
    time, dates, note = _times([row[col[time_name]] for row in cells], time_name, options, where)
    _finite(time.reshape(-1, 1), [time_name], where)
    return (time, values[:, :len(states)], paths, states, line_of,
            {"time_column": time_name, "time_note": note, "dates": dates,
             "skipped_lines": skipped})


def _not_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return True
    return False


def _time_column(header: list[str], name: str, delimiter: str) -> str:
    """The header's time column: 'time', else the first named like a time or a date."""
    if "time" in header:
        return "time"
    near = [h for h in header if h.lower() in TIME_NAMES]
    if near:
        return near[0]
    said = {",": "comma", ";": "semicolon", "\t": "tab"}[delimiter]
    raise UserError(f"data file {name}: no time column in the header {header} (read as "
                    f"{said}-separated); name one column 'time' (numbers, in years) or 'date' "
                    "(dates such as 2020-01-31), e.g. 'date,rate'")


def _parse_date(cell: str, date_format: str | None) -> tuple[np.datetime64, np.datetime64]:
    """A date or date-time: ISO 8601 (Python's fromisoformat: '2020-01-31', '2020-01-31
    16:00', '2020-01-31T16:00:00-05:00') or ``date_format``. Returns the moment in UTC (an
    offset converted) and the local calendar day (what a business-day count reads: a Monday
    midnight in Berlin is a Monday, not Sunday 23:00 UTC)."""
    from datetime import datetime, timezone

    moment = datetime.strptime(cell, date_format) if date_format else datetime.fromisoformat(cell)
    day = np.datetime64(moment.date(), "D")
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return np.datetime64(moment, "s"), day


def _times(cells: list[str], column: str, options: DataConfig, where: Any
           ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Observation times in years: numbers as given, or dates converted by the day count
    ``data.time`` (calendar: days / 365.25; trading: business days / 252, weekends skipped);
    also the dates (datetime64[s], None for numbers) and the sentence that says which."""
    if all(not _not_number(c) for c in cells):
        if options.time not in ("auto", "years"):
            raise UserError(f"data.time={options.time} converts dates, but column {column!r} "
                            "holds numbers, read as years: drop data.time or give dates")
        return (np.array(cells, dtype=float), None,
                f"time: column {column!r}, numbers in years (rates are per year)")
    if options.time == "years":
        bad = next(i for i, c in enumerate(cells) if _not_number(c))
        raise UserError(f"{where(bad)}, column {column}: {cells[bad]!r} is not a number "
                        "(data.time=years); for dates use data.time=calendar or trading")
    dates = np.empty(len(cells), dtype="datetime64[s]")
    local_days = np.empty(len(cells), dtype="datetime64[D]")
    for i, cell in enumerate(cells):
        try:
            dates[i], local_days[i] = _parse_date(cell, options.date_format)
        except ValueError:
            fmt = f"the format data.date_format={options.date_format!r}" if options.date_format \
                else "a number or an ISO date (2020-01-31)"
            raise UserError(f"{where(i)}, column {column}: {cell!r} is not {fmt}; give other "
                            "dates' format as data.date_format, e.g. '%d/%m/%Y'") from None
    unit = "calendar" if options.time == "auto" else options.time
    if unit == "calendar":
        days = (dates - np.datetime64("1970-01-01T00:00:00")) / np.timedelta64(1, "D")
        years = 1970.0 + days / CALENDAR_DAYS
        note = (f"time: dates in column {column!r} → years by calendar days / {CALENDAR_DAYS:g} "
                f"(data.time=calendar{', the default' if options.time == 'auto' else ''}; "
                f"data.time=trading counts business days / {TRADING_DAYS})")
    else:
        day = local_days
        weekend = np.flatnonzero(~np.is_busday(day))
        if weekend.size:
            raise UserError(f"{where(int(weekend[0]))}, column {column}: {day[weekend[0]]} is a "
                            "weekend day, which data.time=trading does not count; use "
                            "data.time=calendar")
        years = 1970.0 + np.busday_count(np.datetime64("1970-01-01"), day) / TRADING_DAYS
        note = (f"time: dates in column {column!r} → years by business days / {TRADING_DAYS} "
                "(data.time=trading; weekends skipped, holidays counted)")
    return years.astype(float), dates, note


def _read_npz(file: Path, name: str, options: DataConfig) -> tuple[Any, ...]:
    try:
        if not zipfile.is_zipfile(file):  # np.load would try it as a pickle and say so
            raise UserError(f"data file {name} is not an .npz archive (np.savez writes one)")
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"data file {name} is not a readable .npz ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'truncated?'})") from None
    unknown = sorted(set(arrays) - set(NPZ_FIELDS))
    if unknown:
        raise UserError(f"data file {name}: unknown array {unknown[0]!r}; the arrays are "
                        f"{list(NPZ_FIELDS)} (path and state_names optional)")
    for key in ("time", "state"):
        if key not in arrays:
            raise UserError(f"data file {name}: no {key!r} array (it has {sorted(arrays)}); the "
                            "schema needs time (N,) and state (N, d)")
    where = lambda i: f"data file {name} row {i}"  # noqa: E731
    time, state = arrays["time"], arrays["state"]
    for key, value in (("time", time), ("state", state)):
        if not np.issubdtype(value.dtype, np.number) or np.iscomplexobj(value):
            raise UserError(f"data file {name}: {key} has dtype {value.dtype}; it must hold real numbers")
    if time.ndim != 1:
        raise UserError(f"data file {name}: time has shape {time.shape}; it must be (N,)")
    state = state.reshape(-1, 1) if state.ndim == 1 else state
    if state.ndim != 2 or state.shape[0] != time.shape[0]:
        raise UserError(f"data file {name}: state has shape {arrays['state'].shape}; with "
                        f"{time.shape[0]} times it must be ({time.shape[0]}, d)")
    if time.shape[0] == 0:
        raise UserError(f"data file {name} holds no observations (time is empty)")
    names = default_state_names(state.shape[1])
    if "state_names" in arrays:
        given = arrays["state_names"].reshape(-1)
        if given.dtype.kind not in "US" or given.shape[0] != state.shape[1]:
            raise UserError(f"data file {name}: state_names must be {state.shape[1]} strings "
                            f"(got {given.dtype} of shape {given.shape})")
        names = [str(s) for s in given]
    paths = np.zeros(time.shape[0], dtype=np.int64)
    if "path" in arrays:
        p = arrays["path"]
        if p.shape != time.shape or not np.issubdtype(p.dtype, np.number):
            raise UserError(f"data file {name}: path has shape {p.shape} and dtype {p.dtype}; it "
                            f"must be {time.shape[0]} integers")
        paths = _path_ids(p.astype(float), where, "path")
    if options.columns:
        unknown = [c for c in options.columns if c not in names]
        if unknown:
            raise UserError(f"data.columns={list(options.columns)}: {unknown[0]!r} is not a state "
                            f"of {name}; its state_names are {names}")
        state, names = state[:, [names.index(c) for c in options.columns]], list(options.columns)
    _finite(time.astype(float).reshape(-1, 1), ["time"], where)
    return (time.astype(float), state.astype(float), paths, names, None,
            {"time_note": "time: array 'time', numbers in years (rates are per year)"})


def _finite(values: np.ndarray, names: list[str], where: Any) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise UserError(f"{where(int(i))}, column {names[j]}: {values[i, j]} (values must be "
                        "finite numbers)")


def _path_ids(values: np.ndarray, where: Any, what: str) -> np.ndarray:
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{where(i)}, {what}: {values[i]} is not an integer path id")
    return values.astype(np.int64)


def _check(obs: Observations, dim: int | None) -> None:
    """The checks shared by both formats: finite states, dimension, increasing times, enough
    observations for a transition."""
    where = lambda i: f"data file {obs.where(i)}"  # noqa: E731
    _finite(obs.state, obs.state_names, where)
    if dim is not None and obs.dim != dim:
        raise UserError(f"data file {obs.source} has {obs.dim} state column(s) "
                        f"{obs.state_names} but equation.dim={dim}: choose {dim} of them with "
                        f"data.columns=[{','.join(obs.state_names[-dim:])}] (for instance), or "
                        f"set equation.dim={obs.dim}")
    order = np.argsort(obs.path, kind="stable")
    same = obs.path[order][1:] == obs.path[order][:-1]
    step = obs.time[order][1:] - obs.time[order][:-1]
    bad = same & ~(step > 0)
    if bad.any():
        k = int(np.argmax(bad))
        prev, row = int(order[k]), int(order[k + 1])
        place = obs.where(prev)[len(obs.source) + 1:]
        shown = (lambda i: str(obs.dates[i])) if obs.dates is not None else \
            (lambda i: f"{obs.time[i]:g}")
        raise UserError(f"{where(row)}, column {obs.time_column}: {shown(row)} is not after "
                        f"{shown(prev)} ({place}) of path "
                        f"{obs.path[row]}; times must increase strictly within a path")
    if not same.any():
        raise UserError(f"data file {obs.source} has no transition: every path has a single "
                        f"observation ({obs.time.shape[0]} rows, {obs.n_paths} path(s))")


def check_state_space(obs: Observations, lower_bound: float | None,
                      what: str = "the SDE") -> None:
    """A UserError at the first state ≤ ``lower_bound`` (CIR, CEV, GBM live above 0), naming
    the file, line/row and column; ``what`` names the model, e.g. "equation.sde.kind=cir"."""
    if lower_bound is None:
        return
    bad = obs.state <= lower_bound
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise UserError(f"data file {obs.where(i)}, column {obs.state_names[j]}: "
                        f"{obs.state[i, j]:g} is not above {lower_bound:g}, where {what} lives")


# --- writing ----------------------------------------------------------------------------------
def _csv_text(obs: Observations) -> str:
    several = obs.n_paths > 1
    header = ["time", *obs.state_names] + (["path"] if several else [])
    lines = [",".join(header)]
    for i in range(obs.time.shape[0]):  # repr: the shortest text that reads back exactly
        cells = [repr(float(obs.time[i]))] + [repr(float(v)) for v in obs.state[i]]
        lines.append(",".join(cells + ([str(int(obs.path[i]))] if several else [])))
    return "\n".join(lines) + "\n"


def write_observations(obs: Observations, stem: Path) -> list[Path]:
    """``stem.csv`` and ``stem.npz`` with the same observations, each written atomically (the
    CSV has a ``path`` column only when there are several paths)."""
    stem = Path(stem)
    csv_path, npz_path = Path(f"{stem}.csv"), Path(f"{stem}.npz")
    text = _csv_text(obs)
    atomic_write(csv_path, lambda h: h.write(text.encode()))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, time=obs.time, state=obs.state, path=obs.path,
                        state_names=np.array(obs.state_names, dtype=str))
    atomic_write(npz_path, lambda h: h.write(buffer.getvalue()))
    return [csv_path, npz_path]


def describe_steps(dt: np.ndarray) -> dict[str, float]:
    """min / median / max of the time steps (what summaries and messages quote)."""
    if dt.size == 0:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": float(dt.min()), "median": float(np.median(dt)), "max": float(dt.max())}
