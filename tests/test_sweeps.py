"""Sweeps survive failing jobs: a diverging or misconfigured job is recorded as failed and the
sweep (or Optuna study) goes on; the summary lists every job; Ctrl+C still stops everything."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from helpers import TINY, cfg_of
from helpers.launcher import cli
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback

from fcn_lightning.app.sweeps import (
    NO_METRICS,
    STALE_METRICS,
    STILL_RUNNING,
    SweepSummary,
    job_folders,
    read_job,
    train_job,
)

TESTS = Path(__file__).resolve().parent
POISON = "+callbacks.poison._target_=interrupts.PoisonAtStep"


def summary_of(root: Path) -> list[dict]:
    return json.loads((root / "summary.json").read_text())


class SigintAtStep(Callback):
    """Presses Ctrl+C (SIGINT to this process) after the given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


# --------------------------------------------------------------------------- the CLI
def test_a_diverging_job_fails_alone_and_the_sweep_goes_on(tmp_path):
    result = cli("-m", "arch=fcn32s", POISON, "+callbacks.poison.step=1000,0,2000", *TINY,
                 f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]  # jobs failed: scripts must notice
    assert (tmp_path / "0/metrics.json").is_file() and (tmp_path / "2/metrics.json").is_file()
    jobs = summary_of(tmp_path)
    assert [j["job"] for j in jobs] == ["0", "1", "2"]
    assert [j["status"] for j in jobs] == ["finished", "failed", "finished"]
    assert "+callbacks.poison.step=0" in jobs[1]["overrides"] and jobs[1]["metrics"] == {}
    assert "training loss is" in jobs[1]["reason"] and "epoch 0, step 0" in jobs[1]["reason"]
    assert jobs[0]["reason"] is None and "fcn32s" in jobs[2]["metrics"]
    rows = (tmp_path / "summary.txt").read_text().splitlines()
    failed = [r for r in rows if r.startswith("1 ")]
    assert len(failed) == 1 and "FAILED" in failed[0] and "training loss is" in failed[0]
    assert "1 of 3 jobs failed" in output
    assert json.loads((tmp_path / "1/run.json").read_text())["status"] == "failed"


def test_a_bad_setting_fails_its_job_with_the_settings_message(tmp_path):
    result = cli("-m", "arch=fcn32s", "arch.geometry=sideways,same", *TINY,
                 f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    bad, good = summary_of(tmp_path)
    assert bad["status"] == "failed" and "geometry must be one of" in bad["reason"]
    assert "sideways" in bad["reason"] and good["status"] == "finished"
    assert "FAILED" in (tmp_path / "summary.txt").read_text()


def test_optuna_study_goes_on_after_a_failed_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    states = tmp_path / "trials.json"
    # the poison step is the job number: trial 0 diverges at its first step, trial 1 trains
    result = cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "arch=fcn32s", POISON,
                 "+callbacks.poison.step=${hydra:job.num}", *TINY, f"hydra.sweep.dir={tmp_path}",
                 cwd=tmp_path, spy=states)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]  # a study with a best trial did its work
    trials = json.loads(states.read_text())
    assert [state for state, _ in trials] == ["FAIL", "COMPLETE"]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    jobs = summary_of(tmp_path)
    assert [j["status"] for j in jobs] == ["failed", "finished"]
    assert "training loss is" in jobs[0]["reason"]
    assert best["best_value"] == pytest.approx(jobs[1]["metrics"]["fcn32s"]["mIoU"])
    assert best["best_value"] == pytest.approx(trials[1][1])
    assert "1 of 2 jobs failed" in output


def test_optuna_study_whose_every_trial_fails_says_so(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "arch=fcn32s",
                 "arch.geometry=sideways", *TINY, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert "every job of the sweep failed" in result.stderr
    assert [j["status"] for j in summary_of(tmp_path)] == ["failed", "failed"]
    assert not (tmp_path / "optimization_results.yaml").exists()


def test_ctrl_c_stops_the_whole_sweep(tmp_path):
    result = cli("-m", "arch=fcn32s", "optimizer.lr=1e-3,1e-4", "trainer.max_steps=2",
                 "+callbacks.stop._target_=test_sweeps.SigintAtStep", "+callbacks.stop.step=1",
                 *TINY, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert (tmp_path / "0").is_dir() and not (tmp_path / "1").exists()  # job 1 never started
    assert not (tmp_path / "summary.json").exists()


def test_a_single_run_that_diverges_still_exits_non_zero(tmp_path, capsys):
    cfg = cfg_of("config", ["arch=fcn32s", POISON, "+callbacks.poison.step=0", *TINY], tmp_path)
    with pytest.raises(SystemExit) as stop:  # train.py's job outside a sweep: the command
        train_job(cfg)
    assert stop.value.code not in (0, None)
    assert "training loss is" in capsys.readouterr().err + str(stop.value.code)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"


def test_a_job_failing_before_it_claims_its_folder_is_recorded_there(tmp_path):
    # job 0 fails on a setting checked before the pipeline claims the folder; job 1's folder
    # holds an earlier run's metrics (a run from before run.json): it is not written to
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(METRICS))
    result = cli("-m", "arch=fcn32s", "scheduler=poly", *TINY, "trainer.max_steps=-1",
                 "stages.fcn32s.max_steps=null", "optimizer.lr=1,2", f"hydra.sweep.dir={tmp_path}",
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    record = json.loads((tmp_path / "0" / "run.json").read_text())
    assert record["status"] == "failed" and "has no step or epoch limit" in record["reason"]
    assert not (tmp_path / "1" / "run.json").exists()
    first, second = summary_of(tmp_path)
    assert first["status"] == "failed" and "has no step or epoch limit" in first["reason"]
    assert second["status"] == "failed" and second["reason"] == STALE_METRICS


# --------------------------------------------------------------------------- the summary
METRICS = {"fcn32s": {"mIoU": 0.5, "pixel_acc": 0.75, "mean_acc": 0.6, "fwIoU": 0.7}}


def make_job(root: Path, name: str, overrides: list[str], metrics=None, record=None) -> Path:
    """A job folder as a sweep leaves it: .hydra/overrides.yaml, maybe metrics.json (a dict, or
    a string for a damaged file) and run.json."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    for file, data in (("metrics.json", metrics), ("run.json", record)):
        if data is not None:
            (folder / file).write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


def sweep_end(root: Path, **kwargs) -> SweepSummary:
    callback = SweepSummary(**kwargs)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}})
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    return callback


def test_summary_lists_every_job_with_status_and_reason(tmp_path, capsys):
    make_job(tmp_path, "0", ["arch=fcn32s", "optimizer.lr=0.1"], METRICS)  # before run.json
    make_job(tmp_path, "1", ["arch=fcn32s", "optimizer.lr=0.2"])  # died early
    make_job(tmp_path, "2", ["arch=fcn32s", "optimizer.lr=0.3"], "{not json")
    make_job(tmp_path, "3", ["arch=fcn32s", "optimizer.lr=0.4"],
             record={"status": "failed", "reason": "fcn32s: the training loss is nan at step 3"})  # fmt: skip
    make_job(tmp_path, "4", ["arch=fcn32s", "optimizer.lr=0.5"], METRICS, {"status": "finished"})
    make_job(tmp_path, "5", ["arch=fcn32s", "optimizer.lr=0.6"], record={"status": "running"})
    make_job(tmp_path, "6", ["arch=fcn32s", "optimizer.lr=0.7"], METRICS,
             {"status": "interrupted", "reason": "fcn16s stopped by SIGTERM"})  # fmt: skip
    make_job(tmp_path, "7", ["arch=fcn32s", "optimizer.lr=0.8"], "[1, 2]", {"status": "finished"})
    callback = sweep_end(tmp_path)
    jobs = summary_of(tmp_path)
    assert callback.jobs == jobs and SweepSummary.current is callback
    assert [j["job"] for j in jobs] == [str(i) for i in range(8)]
    assert all(set(j) == {"job", "overrides", "metrics", "status", "reason"} for j in jobs)
    status = {j["job"]: (j["status"], j["reason"]) for j in jobs}
    assert status["0"] == ("finished", None) and status["4"] == ("finished", None)
    assert status["1"] == ("failed", NO_METRICS)
    assert status["2"][0] == "failed" and "metrics.json is unreadable" in status["2"][1]
    assert status["3"] == ("failed", "fcn32s: the training loss is nan at step 3")
    assert status["5"] == ("failed", STILL_RUNNING)
    assert status["6"] == ("interrupted", "fcn16s stopped by SIGTERM")
    assert status["7"][0] == "failed" and "run.json says finished, but" in status["7"][1]
    assert jobs[6]["metrics"] == METRICS and jobs[1]["metrics"] == {} == jobs[2]["metrics"]
    text = (tmp_path / "summary.txt").read_text()
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "FAILED" not in rows["0"] and "50.0" in rows["0"] and "optimizer.lr=0.1" in rows["0"]
    assert "arch=fcn32s" not in text  # the same in every job: not a swept setting
    assert "FAILED" in rows["1"] and NO_METRICS in rows["1"]
    assert "FAILED" in rows["3"] and "training loss is nan at step 3" in rows["3"]
    assert "INTERRUPTED" in rows["6"]
    out = capsys.readouterr().out
    assert "5 of 8 jobs failed, 1 interrupted (jobs 1, 2, 3, 5, 6, 7)" in out
    assert "5 of 8 jobs failed, 1 interrupted" in callback.exit_message()


def test_summary_orders_jobs_numerically_and_finds_them_by_folder(tmp_path):
    for i in range(12):
        make_job(tmp_path, str(i), [f"optimizer.lr={i}"], METRICS if i % 2 else None)
    (tmp_path / "12").mkdir()  # no .hydra, no run.json: not a job
    (tmp_path / "13").mkdir()
    (tmp_path / "13" / "run.json").write_text(json.dumps({"status": "running", "pid": 1}))
    (tmp_path / "tensorboard" / ".hydra").mkdir(parents=True)  # not numbered: not a job
    (tmp_path / "14").write_text("a file")
    assert [p.name for p in job_folders(tmp_path)] == [str(i) for i in range(12)] + ["13"]
    sweep_end(tmp_path)
    jobs = summary_of(tmp_path)
    assert [j["job"] for j in jobs] == [*map(str, range(12)), "13"]
    assert jobs[10]["overrides"] == ["optimizer.lr=10"] and jobs[-1]["overrides"] == []
    rows = (tmp_path / "summary.txt").read_text().splitlines()[1:]
    assert [r.split()[0] for r in rows] == [*map(str, range(12)), "13"]


def test_metrics_older_than_a_job_without_run_json_are_not_its_own(tmp_path):
    folder = make_job(tmp_path, "0", ["optimizer.lr=1"], METRICS)
    stamp = folder / ".hydra" / "config.yaml"
    stamp.write_text("{}")  # Hydra writes it when the job starts
    os.utime(folder / "metrics.json", (stamp.stat().st_mtime - 60,) * 2)
    job = read_job(folder)
    assert (job["status"], job["reason"], job["metrics"]) == ("failed", STALE_METRICS, {})
    (folder / "run.json").write_text(json.dumps({"status": "finished"}))  # resumed, all skipped
    assert read_job(folder)["status"] == "finished"


def test_exit_status_follows_fail_when(tmp_path):
    make_job(tmp_path, "0", ["optimizer.lr=1"], METRICS)
    make_job(tmp_path, "1", ["optimizer.lr=2"])
    assert "1 of 2 jobs failed" in sweep_end(tmp_path).exit_message()
    assert sweep_end(tmp_path, fail_when="all").exit_message() is None
    assert sweep_end(tmp_path, fail_when="never").exit_message() is None
    (tmp_path / "0" / "metrics.json").unlink()
    assert "every job" in sweep_end(tmp_path, fail_when="all").exit_message()
    with pytest.raises(ValueError, match="fail_when"):
        SweepSummary(fail_when="sometimes")


def test_jobs_started_tells_a_sweep_that_ran_from_one_refused_at_its_start(tmp_path):
    old = make_job(tmp_path, "0", ["optimizer.lr=1"], METRICS)  # an earlier sweep's job
    (old / ".hydra" / "config.yaml").write_text("{}")
    os.utime(old / ".hydra" / "config.yaml", (1e9, 1e9))
    callback = SweepSummary()
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert not callback.jobs_started()
    (make_job(tmp_path, "1", ["optimizer.lr=2"]) / ".hydra" / "config.yaml").write_text("{}")
    assert callback.jobs_started()


def test_summary_of_a_sweep_without_jobs_writes_nothing(tmp_path):
    assert sweep_end(tmp_path).exit_message() is None
    assert not (tmp_path / "summary.json").exists()
    assert read_job(tmp_path / "nope")["status"] == "failed"
