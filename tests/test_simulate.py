"""The observation schema (neuralpde_cli/data.py) and `neuralpde simulate` end to end.

Every bad-input class of the reader is checked in-process (fast); a few go through the CLI to
check they reach the user as one line with exit status 2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from neuralpde_cli.data import (DataConfig, Observations, check_state_space, read_observations,
                                write_observations)
from neuralpde_cli.errors import UserError


# --- the reader, every bad-input class --------------------------------------------------------
def _csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, dim, message", [
    ("when,x\n0,1\n1,2\n", None, r"d.csv: no time column in the header \['when', 'x'\] \(read as "
     r"comma-separated\); name one column 'time' \(numbers, in years\) or 'date'"),
    ("when;x;y\n0;1;2\n", None, r"\(read as semicolon-separated\)"),
    ("time,path\n0,0\n1,0\n", None, "d.csv: no state column"),
    ("time,x,y\n0,1,2\n1,2,3\n", 1, r"has 2 state column\(s\) \['x', 'y'\] but equation.dim=1"),
    ("time,x\n0,1\n1,2\n", 2, r"has 1 state column\(s\) \['x'\] but equation.dim=2"),
    ("time,x\n0,1\n1,2,7\n", None, "d.csv line 3: 3 fields, more than the 2 columns"),
    ("time,x,y\n0,1,2\n1,2\n", None, "d.csv line 3: 2 fields, fewer than the 3 columns"),
    ("time,x,x\n0,1,1\n", None, "d.csv line 1: column 'x' appears twice"),
    ("time,,x\n0,1,1\n", None, "d.csv line 1: column 2 has no name"),
    ("time,x\n0,1\n0.5,abc\n", None, "d.csv line 3, column x: 'abc' is not a number"),
    ("time,x\n0,1\ninf,2\n", None, "d.csv line 3, column time: inf"),
    ("time,x\n0,1\n1,inf\n", None, "d.csv line 3, column x: inf"),
    ("time,x\nNA,1\n1,NA\n", None, "d.csv: every observation has a missing value"),
    ("date,x\n2020-01-02,1\n02/01/2020,2\n", None, r"line 3, column date: '02/01/2020' is not "
     r"a number or an ISO date \(2020-01-31\); give other dates' format as data.date_format"),
    ("time,x\n0,1\n0.5,2\n0.5,3\n", None, r"d.csv line 4, column time: 0.5 is not after 0.5 \(line 3\) of path 0"),
    ("time,x,path\n0,1,0\n2,1,1\n1,2,0\n0.5,2,0\n", None, r"line 5, column time: 0.5 is not after 1 \(line 4\) of path 0"),
    ("time,x,path\n0,1,0\n1,2,0.5\n", None, "d.csv line 3, column path: 0.5 is not an integer path id"),
    ("time,x\n", None, "d.csv has a header but no observations"),
    ("", None, "d.csv is empty"),
    ("time,x,path\n0,1,0\n0,2,1\n", None, "has no transition: every path has a single observation"),
])
def test_csv_bad_input_is_one_clear_error(tmp_path: Path, text: str, dim, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        read_observations(_csv(tmp_path, text), dim=dim)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_semicolon_and_tab_files_read_like_commas(tmp_path: Path, delimiter: str) -> None:
    """A spreadsheet's ';' (or tab) file holds the same observations as its comma twin."""
    rows = ["time,rate", "0,1.5", "0.25,1.75", "0.5,1.25"]
    comma = read_observations(_csv(tmp_path, "\n".join(rows) + "\n", "c.csv"))
    other = read_observations(_csv(tmp_path, "\n".join(r.replace(",", delimiter) for r in rows)
                                   + "\n", "s.csv"))
    np.testing.assert_array_equal(other.state, comma.state)
    np.testing.assert_array_equal(other.time, comma.time)
    assert other.state_names == comma.state_names == ["rate"]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.csv: no such file"):
        read_observations(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="is a folder"):
        read_observations(tmp_path)
    with pytest.raises(UserError, match=r"unknown format '.txt'; use one of \['.csv', '.npz'\]"):
        read_observations(_csv(tmp_path, "time,x\n", "d.txt"))
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(UserError, match="bin.csv is not UTF-8 text"):
        read_observations(tmp_path / "bin.csv")
    with pytest.raises(UserError, match="junk.npz is not an .npz archive"):
        read_observations(_csv(tmp_path, "time,x\n0,1\n", "junk.npz"))
    (tmp_path / "cut.npz").write_bytes(_npz_bytes(tmp_path, time=np.arange(3.0), state=np.ones(3))[:60])
    with pytest.raises(UserError, match="cut.npz"):
        read_observations(tmp_path / "cut.npz")


def _npz_bytes(tmp_path: Path, **arrays) -> bytes:
    np.savez(tmp_path / "tmp.npz", **arrays)
    return (tmp_path / "tmp.npz").read_bytes()


@pytest.mark.parametrize("arrays, message", [
    ({"time": np.arange(3.0)}, r"no 'state' array \(it has \['time'\]\)"),
    ({"time": np.arange(3.0), "state": np.ones(3), "extra": np.ones(3)}, "unknown array 'extra'"),
    ({"time": np.arange(3.0), "state": np.ones((4, 1))}, r"state has shape \(4, 1\); with 3 times"),
    ({"time": np.arange(3.0), "state": np.array([1.0, np.nan, 2.0])}, "d.npz row 1, column x: nan"),
    ({"time": np.array([0.0, 1.0, 1.0]), "state": np.ones(3)}, "d.npz row 2, column time: 1 is not after 1 "
                                                                r"\(row 1\)"),
    ({"time": np.arange(3.0), "state": np.ones(3), "path": np.array([0, 1])}, "path has shape"),
    ({"time": np.arange(3.0), "state": np.ones((3, 2)), "state_names": np.array(["a"])},
     "state_names must be 2 strings"),
    ({"time": np.array(["a", "b"]), "state": np.ones(2)}, "time has dtype <U1"),
])
def test_npz_bad_input_is_one_clear_error(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=message):
        read_observations(tmp_path / "d.npz")


def test_state_space_check_names_file_line_and_column(tmp_path: Path) -> None:
    obs = read_observations(_csv(tmp_path, "time,rate\n0,0.3\n1,0.2\n2,-0.01\n"))
    check_state_space(obs, None, "equation.sde.kind=ou")
    with pytest.raises(UserError, match=r"d.csv line 4, column rate: -0.01 is not above 0, where "
                                        "equation.sde.kind=cir lives"):
        check_state_space(obs, 0.0, "equation.sde.kind=cir")


def test_round_trip_several_paths_irregular_steps(tmp_path: Path) -> None:
    """CSV and npz hold the same numbers bit for bit; transitions stay within their path, in
    the order of the path ids, whatever the row order of the file."""
    rng = np.random.default_rng(0)
    time = np.concatenate([np.cumsum(rng.exponential(0.3, 5)), np.cumsum(rng.exponential(0.3, 4))])
    obs = Observations(time, rng.normal(size=(9, 2)), np.array([3] * 5 + [1] * 4), ["a", "b"])
    paths = write_observations(obs, tmp_path / "data")
    assert [p.name for p in paths] == ["data.csv", "data.npz"]
    assert (tmp_path / "data.csv").read_text().splitlines()[0] == "time,a,b,path"
    for path in paths:
        back = read_observations(path, dim=2)
        np.testing.assert_array_equal(back.time, obs.time)
        np.testing.assert_array_equal(back.state, obs.state)
        np.testing.assert_array_equal(back.path, obs.path)
        assert back.state_names == ["a", "b"] and back.n_paths == 2
        tr = back.transitions()
        assert tr.n == 7 and list(tr.path) == [1, 1, 1, 3, 3, 3, 3]
        np.testing.assert_array_equal(tr.x0[0], obs.state[5])
        np.testing.assert_array_equal(tr.x1[0], obs.state[6])
        np.testing.assert_allclose(tr.dt, np.concatenate([np.diff(time[5:]), np.diff(time[:5])]))
    # a single path has no path column; blank lines are skipped but lines still count
    single = Observations(np.arange(3.0), np.ones((3, 1)), np.zeros(3))
    write_observations(single, tmp_path / "one")
    assert (tmp_path / "one.csv").read_text().splitlines()[0] == "time,x"
    with pytest.raises(UserError, match="line 4, column x: a missing value"):
        read_observations(_csv(tmp_path, "time,x\n\n0,1\n1,nan\n0,1\n"),
                          options=DataConfig(missing="refuse"))


# --- your own file: dates, day counts, columns by name, missing values ------------------------
def test_dates_become_years_by_the_stated_day_count(tmp_path: Path) -> None:
    """ISO dates (Friday → Monday is 3 calendar days but 1 business day), a strftime format
    for others, and numbers that stay years."""
    text = "Date,close\n2024-03-01,10\n2024-03-04,11\n2024-03-05,12\n"
    calendar = read_observations(_csv(tmp_path, text))
    np.testing.assert_allclose(np.diff(calendar.time) * 365.25, [3, 1], rtol=1e-9)
    assert calendar.time[0] == pytest.approx(2024 + (np.datetime64("2024-03-01") - np.datetime64(
        "2024-01-01")) / np.timedelta64(1, "D") / 365.25, abs=0.01)
    assert "calendar days / 365.25" in calendar.time_note and "the default" in calendar.time_note
    trading = read_observations(_csv(tmp_path, text), options=DataConfig(time="trading"))
    np.testing.assert_allclose(np.diff(trading.time) * 252, [1, 1], rtol=1e-9)
    european = "date;close\n01/03/2024;10\n04/03/2024;11\n"
    obs = read_observations(_csv(tmp_path, european, "e.csv"),
                            options=DataConfig(date_format="%d/%m/%Y"))
    assert str(obs.dates[1])[:10] == "2024-03-04"
    with pytest.raises(UserError, match="2024-03-02 is a weekend day"):
        read_observations(_csv(tmp_path, "date,x\n2024-03-01,1\n2024-03-02,2\n", "w.csv"),
                          options=DataConfig(time="trading"))
    with pytest.raises(UserError, match="data.time=trading converts dates, but column 'time' "
                                        "holds numbers"):
        read_observations(_csv(tmp_path, "time,x\n0,1\n1,2\n", "n.csv"),
                          options=DataConfig(time="trading"))


def test_spreadsheet_exports_read_as_written(tmp_path: Path) -> None:
    """A ';' file with decimal commas, date-times with a UTC offset, and a price download's
    many columns (the error says which key picks one)."""
    obs = read_observations(_csv(tmp_path, "date;rate\n2024-03-01;1,5\n2024-03-04;-0,25\n", "s.csv"))
    np.testing.assert_array_equal(obs.state[:, 0], [1.5, -0.25])
    stamped = read_observations(_csv(tmp_path, "timestamp,x\n2024-03-01 16:00:00-05:00,1\n"
                                     "2024-03-01T23:00:00+01:00,2\n", "z.csv"))
    assert [str(d) for d in stamped.dates] == ["2024-03-01T21:00:00", "2024-03-01T22:00:00"]
    assert np.diff(stamped.time)[0] * 365.25 * 24 == pytest.approx(1.0)
    berlin = read_observations(_csv(tmp_path, "date,x\n2024-01-05 00:00:00+01:00,1\n"
                                    "2024-01-08 00:00:00+01:00,2\n", "b.csv"),
                               options=DataConfig(time="trading"))  # Friday → Monday, local days
    assert np.diff(berlin.time)[0] * 252 == pytest.approx(1.0)
    with pytest.raises(UserError, match=r"z2.csv line 3, column timestamp: 2024-03-01T21:00:00 is "
                                        r"not after 2024-03-01T21:00:00 \(line 2\)"):
        read_observations(_csv(tmp_path, "timestamp,x\n2024-03-01 16:00:00-05:00,1\n"
                                         "2024-03-01T22:00:00+01:00,2\n", "z2.csv"))
    yahoo = "Date,Open,High,Low,Close,Volume\n2024-03-01,1,2,0.5,1.5,100\n2024-03-04,1,2,0.5,1.6,90\n"
    with pytest.raises(UserError, match=r"has 5 state column\(s\) \['Open', 'High', 'Low', 'Close', "
                                        r"'Volume'\] but equation.dim=1: choose 1 of them with "
                                        r"data.columns=\[Volume\] \(for instance\)"):
        read_observations(_csv(tmp_path, yahoo, "y.csv"), dim=1)
    close = read_observations(_csv(tmp_path, yahoo, "y.csv"), dim=1,
                              options=DataConfig(columns=["Close"]))
    np.testing.assert_array_equal(close.state[:, 0], [1.5, 1.6])


def test_columns_by_name_and_missing_values_skipped_or_refused(tmp_path: Path) -> None:
    text = ("date,ticker,vix,volume\n2024-03-01,VIX,13.1,5\n2024-03-04,VIX,NA,6\n"
            "2024-03-05,VIX,14.2,.\n2024-03-06,VIX,15.0,7\n")
    with pytest.raises(UserError, match=r"line 2, column ticker: 'VIX' is not a number; a column "
                                        r"of labels\? choose the state columns with "
                                        r"data.columns=\[vix,volume\]"):
        read_observations(_csv(tmp_path, text))
    obs = read_observations(_csv(tmp_path, text), options=DataConfig(columns=["vix"]))
    assert obs.state_names == ["vix"] and obs.skipped_lines == [3]
    np.testing.assert_array_equal(obs.state[:, 0], [13.1, 14.2, 15.0])
    tr = obs.transitions()  # the transition across the gap spans it: 4 calendar days
    np.testing.assert_allclose(tr.dt * 365.25, [4, 1], rtol=1e-9)
    assert list(obs.line[tr.row]) == [4, 5]  # still pointing at the file's lines
    both = read_observations(_csv(tmp_path, text), options=DataConfig(columns=["volume", "vix"]))
    assert both.state_names == ["volume", "vix"] and both.skipped_lines == [3, 4]
    with pytest.raises(UserError, match=r"line 3, column vix: a missing value \(NA\)"):
        read_observations(_csv(tmp_path, text), options=DataConfig(columns=["vix"],
                                                                   missing="refuse"))
    with pytest.raises(UserError, match=r"data.columns=\['price'\]: 'price' is not a state "
                                        r"column of .*d.csv; its header is"):
        read_observations(_csv(tmp_path, text), options=DataConfig(columns=["price"]))
    with pytest.raises(UserError, match=r"data.missing=maybe: choose one of \['skip', 'refuse'\]"):
        read_observations(_csv(tmp_path, text), options=DataConfig(missing="maybe"))


# --- `neuralpde simulate` end to end ------------------------------------------------------------
def test_simulate_ou_writes_the_schema_and_the_exact_law(cli, tmp_path: Path) -> None:
    """1-D OU, 4 paths × 400 exact steps of Δt = 0.5 from the stationary mean: read back
    through the schema, and each transition standardized by the exact law is N(0, 1)."""
    out = cli("simulate", "simulate.paths=4", "simulate.observations=400", "simulate.dt=0.5",
              "equation.sde.sigma=[[0.4]]", "equation.sde.mean=[0.3]", "seed=5", "hydra.run.dir=run")
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "exact"
    assert summary["true_values"] == {"theta": 1.0, "mean": 0.3, "sigma": 0.4}
    assert summary["n_transitions"] == 1600 and summary["paths"] == 4
    assert summary["dt"] == {"min": 0.5, "median": 0.5, "max": 0.5}
    assert (run / "plots" / "paths.png").stat().st_size > 10_000
    csv_obs, npz_obs = read_observations(run / "data.csv", dim=1), read_observations(run / "data.npz")
    np.testing.assert_array_equal(csv_obs.state, npz_obs.state)
    np.testing.assert_array_equal(csv_obs.time, npz_obs.time)
    assert (run / "data.csv").read_text().splitlines()[0] == "time,x,path"
    assert csv_obs.n_paths == 4 and csv_obs.time.shape == (1604,)
    tr = csv_obs.transitions()
    assert tr.n == 1600 and np.all(tr.x0[tr.t0 == 0] == 0.3)
    decay = math.exp(-0.5)
    z = (tr.x1[:, 0] - 0.3 - (tr.x0[:, 0] - 0.3) * decay) / (0.4 * math.sqrt((1 - decay ** 2) / 2))
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # the same seed gives the same data set
    again = cli("simulate", "simulate.paths=4", "simulate.observations=400", "simulate.dt=0.5",
                "equation.sde.sigma=[[0.4]]", "equation.sde.mean=[0.3]", "seed=5", "hydra.run.dir=again")
    assert again.returncode == 0
    assert (tmp_path / "again" / "data.csv").read_text() == (run / "data.csv").read_text()


def test_simulate_irregular_euler_cev_several_paths(cli, tmp_path: Path) -> None:
    """CEV has no exact law: Euler sub-steps, exponential steps; summary says so."""
    out = cli("simulate", "equation.sde.kind=cev", "equation.sde.rate=3", "equation.sde.level=2",
              "equation.sde.noise=0.2", "equation.sde.gamma=0.5", "simulate.paths=3",
              "simulate.observations=50", "simulate.dt=0.1", "simulate.irregular=exponential",
              "simulate.substep=0.01", "hydra.run.dir=run")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "euler" and summary["substep"] == 0.01
    assert summary["true_values"] == {"rate": 3.0, "level": 2.0, "noise": 0.2, "gamma": 0.5}
    obs = read_observations(tmp_path / "run" / "data.npz", dim=1)
    tr = obs.transitions()
    assert tr.n == 150 and obs.n_paths == 3 and np.all(obs.state > 0)
    assert tr.dt.min() < 0.5 * tr.dt.max()          # irregular, and the steps' mean is dt
    assert abs(tr.dt.mean() - 0.1) < 4 * 0.1 / math.sqrt(150)
    assert np.all(obs.state[obs.time == 0] == 2.0)  # the default start: the level


def _config(**simulate):
    """The composed config of `neuralpde simulate` (1-D OU) with simulate.* values replaced."""
    from omegaconf import OmegaConf

    from neuralpde_cli.config import SimulateConfig
    from neuralpde_cli.equations.fokker_planck import FokkerPlanckConfig
    from neuralpde_cli.sdes import SDEConfig
    equation = FokkerPlanckConfig(dim=1, sde=SDEConfig(theta=[[1.0]], mean=[0.0], sigma=[[0.5]]))
    return OmegaConf.merge(OmegaConf.structured(SimulateConfig),
                           {"equation": OmegaConf.structured(equation), "device": {"name": "cpu"},
                            "simulate": simulate})


@pytest.mark.parametrize("values, message", [
    ({"dt": -1.0}, r"simulate.dt=-1.0 must be > 0"),
    ({"substep": 0.0}, r"simulate.substep=0.0 must be > 0"),
    ({"paths": 0}, r"simulate.paths=0 must be an integer ≥ 1"),
    ({"observations": 0}, r"simulate.observations=0 must be an integer ≥ 1"),
    ({"burn_in": -1.0}, r"simulate.burn_in=-1.0 must be ≥ 0"),
    ({"irregular": "poisson"}, r"simulate.irregular='poisson' is unknown; choose one of \['none'"),
    ({"irregular": "uniform", "jitter": 1.0}, r"simulate.jitter=1.0 must lie in \[0, 1\)"),
])
def test_simulate_checks(values: dict, message: str) -> None:
    from neuralpde_cli.tasks.simulate import check
    check(_config())
    with pytest.raises(UserError, match=message):
        check(_config(**values))


@pytest.mark.parametrize("args, message", [
    (["simulate.irregular=poisson"], "simulate.irregular='poisson' is unknown"),
    (["equation.sde.kind=cir", "equation.initial_mean=[-0.5]"], r"equation.initial_mean=\[-0.5\] must lie above 0"),
    (["equation=heat"], "needs equation=fokker_planck"),
])
def test_simulate_bad_input_one_line_nothing_written(cli, tmp_path: Path, args, message) -> None:
    out = cli("simulate", *args, "hydra.run.dir=run")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neuralpde: error:"), out.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_bad_data_through_calibrate_cli(cli, tmp_path: Path) -> None:
    """The reader's errors reach a user of `calibrate` as one line, exit 2."""
    (tmp_path / "d.csv").write_text("time,x\n0,0.1\n1,0.2\n1,0.3\n")
    for data, message in (("missing.csv", "missing.csv: no such file"),
                          ("d.csv", r"d.csv line 4, column time: 1 is not after 1 \(line 3\)")):
        out = cli("calibrate", f"data={data}", "hydra.run.dir=run")
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and re.search(message, lines[0]), out.stderr


def test_every_kind_is_one_family_with_its_parameter_keys() -> None:
    """sdes/build.py's table: each kind but custom has a family constructor and its keys, and
    each builds from the config's defaults (custom needs callables)."""
    import torch

    from neuralpde_cli.sdes import FAMILIES, KINDS, PARAMETER_KEYS, SDEConfig, build_sde
    assert set(KINDS) == set(FAMILIES) | {"custom"} == set(PARAMETER_KEYS)
    for kind in FAMILIES:
        dim = 1 if kind == "merton" else 2  # the defaults' dim; Merton's state is log S alone
        sde = build_sde(SDEConfig(kind=kind), dim, torch.float64, torch.device("cpu"))
        assert sde.dim == dim, kind
