"""neuralpde tune (Optuna studies of solve runs) and neuralpde report (tables over runs).

CPU only, one thread per process; a study's trials are seconds-long grid solves. The slow
test (marked) runs two workers on one journal and a restart of the study.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_summary
from test_scaleout import CLI, run

# --- neuralpde tune -------------------------------------------------------------------------
#: a study over the multigrid tolerance of a seconds-long grid solve: the error follows it
TOL_STUDY = ['solve=["experiment=smoke","equation=diffusion"]',
             'space=["optimizer.tol=tag(log, interval(1e-10, 1e-3))"]', "study.sampler=random"]


def _trials(study: Path) -> list[dict]:
    import csv
    with (study / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def _study(tmp_path: Path, name: str, *args: str) -> Path:
    result, _ = run([*CLI, "tune", *TOL_STUDY, *args, f"hydra.run.dir={tmp_path / name}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name


def test_tiny_study_best_is_the_best_trials_run(tmp_path: Path) -> None:
    study_dir = _study(tmp_path, "a", "study.n_trials=2", "study.seed=5")
    trials = _trials(study_dir)
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    errors = []
    for t in trials:  # each trial is a complete solve run directory with its own summary
        summary = read_summary(Path(t["run_dir"]))
        assert summary["config"]["optimizer"]["tol"] == pytest.approx(float(t["optimizer.tol"]))
        errors.append(summary["metrics"]["rel_l2_error"])
    study = read_summary(study_dir)
    assert study["status"] == "completed" and study["n_trials"] == 2
    assert study["metrics"]["rel_l2_error"] == min(errors)
    best = study["best"][0]
    assert read_summary(Path(best["run_dir"]))["metrics"]["rel_l2_error"] == min(errors)
    assert (study_dir / "plots" / "history.png").is_file()


@pytest.mark.slow
def test_the_same_seed_gives_the_same_trials(tmp_path: Path) -> None:
    a, b, c = (_study(tmp_path, n, "study.n_trials=2", f"study.seed={seed}")
               for n, seed in (("a", 5), ("b", 5), ("c", 6)))
    tols = [[t["optimizer.tol"] for t in _trials(s)] for s in (a, b, c)]
    assert tols[0] == tols[1] and tols[0] != tols[2]


@pytest.mark.slow
def test_two_workers_share_one_journal_and_a_restart_goes_on(tmp_path: Path) -> None:
    study = tmp_path / "s"
    result, _ = run([*CLI, "tune", *TOL_STUDY, "study.n_trials=5", "study.workers=2",
                     f"hydra.run.dir={study}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(study)
    assert len(trials) == 5 and all(t["state"] == "COMPLETE" for t in trials)
    pids = {read_summary(Path(t["run_dir"]))["pid"] for t in trials}
    assert len(pids) == 5  # one solve process per trial
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    loaded = optuna.load_study(study_name="neuralpde",
                               storage=JournalStorage(JournalFileBackend(str(study / "study.journal"))))
    workers = {t.user_attrs["worker_pid"] for t in loaded.trials}
    assert len(workers) == 2, "both worker processes took trials"
    result, _ = run([*CLI, "tune", f"resume={study}", "study.n_trials=7"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(study)
    assert len(trials) == 7 and read_summary(study)["n_trials"] == 7
    tols = [t["optimizer.tol"] for t in trials]
    assert len(set(tols)) == 7  # the restarted sampler does not repeat earlier trials


def test_tune_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, words in (
            (['space=["optimizer.lr=interval(1e-3"]'],
             "space entry optimizer.lr=interval(1e-3 does not parse"),
            (['space=["optimizer.lr=interval(1e-3, 1e-2)"]', "objective=[rel_l3_error]"],
             "objective=rel_l3_error is not a metric the runs write"),
            (['space=["optimizer.lrr=interval(1e-3, 1e-2)"]'], "optimizer.lrr")):
        result, _ = run([*CLI, "tune", *args], tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("neuralpde: error:"), lines
        assert words in lines[0], lines[0]
    assert not (tmp_path / "outputs").exists()


# --- neuralpde report -----------------------------------------------------------------------
def test_report_over_a_two_key_sweep(tmp_path: Path) -> None:
    """A sweep written by hand as Hydra writes one (summary.json, overrides.yaml, metrics.csv):
    the table has every run, the heatmap the two keys, the CSV the errors as written."""
    sweep = tmp_path / "sweep"
    errors = {}
    for job, (lr, width) in enumerate((a, b) for a in ("1e-3", "3e-3") for b in ("32", "64")):
        folder = sweep / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(
            f"- optimizer.lr={lr}\n- ansatz.width={width}\n- experiment=smoke\n")
        errors[job] = 10.0 ** -(job + 2)
        status = "failed" if job == 3 else "completed"
        (folder / "summary.json").write_text(json.dumps(
            {"status": status, "metrics": {"rel_l2_error": errors[job]} if job != 3 else {},
             "wall_time_s": 1.5 * job, "steps": 10, **({"error": "boom"} if job == 3 else {})}))
        (folder / "metrics.csv").write_text("step,phase,loss\n" + "".join(
            f"{s},adam,{(job + 1) / s}\n" for s in range(1, 11)))
    result, _ = run([*CLI, "report", str(sweep), "--tensorboard"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = sweep / "report"
    import csv
    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["optimizer.lr"] for r in rows] == ["1e-3", "1e-3", "3e-3", "3e-3"]
    assert "experiment" not in rows[0]  # the same for every run: not a column
    assert [float(r["rel_l2_error"]) for r in rows[:3]] == [errors[0], errors[1], errors[2]]
    assert rows[3]["status"] == "failed" and rows[3]["error"] == "boom"
    for name in ("report.md", "losses.png", "error_vs_keys.png", "error_heatmap.png"):
        assert (out / name).is_file(), name
    assert "Best rel_l2_error: 1.000e-04 (2)" in (out / "report.md").read_text()
    events = {p.parent.name for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert events == {"0", "1", "2", "3"}  # one TensorBoard run per run directory


def test_report_on_a_folder_without_runs_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result, _ = run([*CLI, "report", str(tmp_path / "empty")], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"neuralpde: error: {tmp_path / 'empty'}: no runs in it (no "
                                     "summary.json at or below it); report takes a run directory, "
                                     "a sweep, a multigrid chain or a study")
    assert list((tmp_path / "empty").iterdir()) == []
