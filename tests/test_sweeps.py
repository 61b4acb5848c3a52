"""Sweeps survive failing jobs: a diverging or misconfigured job is recorded as failed and the
sweep (or Optuna study) goes on; the summary lists every job; Ctrl+C still stops everything."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
import yaml
from helpers import CONF, TINY, cfg_of
from helpers.launcher import cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback

from fcn_lightning.app.sweeps import (
    MAX_NAME,
    NO_METRICS,
    STALE_METRICS,
    STILL_RUNNING,
    OptunaScope,
    SweepSummary,
    best,
    job_dir,
    job_folders,
    read_job,
    train_job,
)

TESTS = Path(__file__).resolve().parent
POISON = "+callbacks.poison._target_=interrupts.PoisonAtStep"


def summary_of(root: Path) -> list[dict]:
    return json.loads((root / "summary.json").read_text())


def names(root: Path) -> list[str]:
    """The sweep's job folders' names, in job order."""
    return [p.name for p in job_folders(root)]


class SigintAtStep(Callback):
    """Presses Ctrl+C (SIGINT to this process) after the given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


# --------------------------------------------------------------------------- the CLI
def test_a_diverging_job_fails_alone_and_the_sweep_goes_on(tmp_path):
    # two swept keys (one of a single value holding '/'), three jobs
    result = cli("-m", "arch=fcn32s", POISON, "+callbacks.poison.step=1000,0,2000", *TINY,
                 "data.root=choice(/x/y)", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]  # jobs failed: scripts must notice
    # each job's folder says what the sweep varies (not what every job shares), '/' no folder
    folders = [f"{n}_+callbacks.poison.step={step},data.root=_x_y" for n, step in
               enumerate((1000, 0, 2000))]  # fmt: skip
    assert names(tmp_path) == folders
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == folders
    first, last = (tmp_path / folders[0]), (tmp_path / folders[2])
    assert (first / "metrics.json").is_file() and (last / "metrics.json").is_file()
    assert list(first.glob("tensorboard/fcn32s/events.*"))  # the run's name: the folder's
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
    assert json.loads((tmp_path / folders[1] / "run.json").read_text())["status"] == "failed"
    # jobs 0 and 2 train the same (their poison never acts): the same mIoU, a tie
    score = f"{jobs[0]['metrics']['fcn32s']['mIoU']:.3f}"
    assert jobs[2]["metrics"] == jobs[0]["metrics"]
    assert rows[-1] == f"tie between jobs 0, 2 (val mIoU {score})" and rows[-1] in output
    assert "best:" not in output


def test_a_bad_setting_fails_its_job_with_the_settings_message(tmp_path):
    result = cli("-m", "arch=fcn32s", "arch.geometry=sideways,same", *TINY,
                 f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    bad, good = summary_of(tmp_path)
    assert bad["status"] == "failed" and "geometry must be one of" in bad["reason"]
    assert "sideways" in bad["reason"] and good["status"] == "finished"
    assert "FAILED" in (tmp_path / "summary.txt").read_text()
    score = f"{good['metrics']['fcn32s']['mIoU']:.3f}"
    assert f"best: job 1 (val mIoU {score})" in (tmp_path / "summary.txt").read_text()
    assert names(tmp_path) == ["0_arch.geometry=sideways", "1_arch.geometry=same"]


SUBDIRS = {  # hydra.sweep.subdir -> the job folders it makes
    "job_${hydra.job.num}": ["job_0", "job_1"],
    "${hydra.job.override_dirname}": ["data.image_size=32", "data.image_size=4"],
    "same": ["same"],  # both jobs in one folder: the second is refused
}


@pytest.mark.parametrize("subdir", list(SUBDIRS))
def test_every_job_counts_whatever_its_folder_is_called(tmp_path, subdir):
    tiny = [o for o in TINY if not o.startswith("data.image_size")]
    result = cli("-m", "arch=fcn32s", *tiny, "data.image_size=32,4", f"hydra.sweep.dir={tmp_path}",
                 f"hydra.sweep.subdir={subdir}", cwd=tmp_path)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]  # a job failed: the sweep says so
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == SUBDIRS[subdir]
    jobs = summary_of(tmp_path)
    assert [(j["job"], j["status"]) for j in jobs] == [("0", "finished"), ("1", "failed")]
    sizes = [[o for o in j["overrides"] if "image_size" in o] for j in jobs]
    assert sizes == [["data.image_size=32"], ["data.image_size=4"]]  # each job's own
    why = jobs[1]["reason"]
    if subdir == "same":
        assert why.startswith("RunFolderError: hydra.sweep.subdir gives jobs one folder: keep")
        assert jobs[1]["metrics"] == {}  # the folder's metrics are job 0's
    else:
        assert why == "ValueError: data.image_size must be >= 8, got 4"  # the cause, not Hydra's
    assert "hydra.run.dir" not in why and "Traceback" not in output
    rows = {r.split()[0]: r for r in (tmp_path / "summary.txt").read_text().splitlines()[1:]}
    assert "FAILED" in rows["1"] and "data.image_size=4" in rows["1"] and why[:40] in rows["1"]
    assert "1 of 2 jobs failed (job 1)" in output


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
    # fcn32s trains one stage: the cuts into later stages are not searched, and said so
    idle = "stages.fcn16s.lr_factor, stages.fcn8s.lr_factor"
    assert f"optuna: not searching {idle}: arch=fcn32s trains one stage" in output
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay"}
    # each trial's folder: its sampled values (its overrides), not the settings all share
    params = yaml.safe_load((job_folders(tmp_path)[1] / ".hydra/overrides.yaml").read_text())
    sampled = sorted(o for o in params if o.startswith("optimizer."))
    assert names(tmp_path)[1] == "1_" + ",".join(sampled) and len(sampled) == 2
    assert f"best: job 1 (val mIoU {trials[1][1]:.3f})" in output


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
    assert result.returncode == 130
    assert names(tmp_path) == ["0_optimizer.lr=0.001"]  # job 1 never started
    assert not list(tmp_path.glob("1*"))
    assert not (tmp_path / "summary.json").exists()
    # the command printed continues the whole sweep, not job 0 alone
    printed = shlex.split(re.search(r"Continue with: (.*)", result.stderr).group(1))
    assert printed[2] == "-m" and "optimizer.lr=1e-3,1e-4" in printed
    assert printed[-2:] == ["resume=true", f"hydra.sweep.dir={tmp_path}"]


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
    (tmp_path / "1_optimizer.lr=2").mkdir()
    (tmp_path / "1_optimizer.lr=2" / "metrics.json").write_text(json.dumps(METRICS))
    result = cli("-m", "arch=fcn32s", "scheduler=poly", *TINY, "trainer.max_steps=-1",
                 "stages.fcn32s.max_steps=null", "optimizer.lr=1,2", f"hydra.sweep.dir={tmp_path}",
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert names(tmp_path) == ["0_optimizer.lr=1", "1_optimizer.lr=2"]
    record = json.loads((tmp_path / "0_optimizer.lr=1" / "run.json").read_text())
    assert record["status"] == "failed" and "has no step or epoch limit" in record["reason"]
    assert not (tmp_path / "1_optimizer.lr=2" / "run.json").exists()
    first, second = summary_of(tmp_path)
    assert first["status"] == "failed" and "has no step or epoch limit" in first["reason"]
    # Hydra's return says why, not the earlier run's metrics.json in its folder
    assert second["status"] == "failed" and "has no step or epoch limit" in second["reason"]
    assert second["metrics"] == {}  # the earlier run's metrics are not this job's


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
    *rows, last = (tmp_path / "summary.txt").read_text().splitlines()[1:]
    assert [r.split()[0] for r in rows] == [*map(str, range(12)), "13"]
    assert last == "tie between jobs 1, 3, 5, 7, 9, 11 (val mIoU 0.500)"


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


def test_job_folder_names_are_safe_and_short():
    assert job_dir(3, "arch=fcn16s,optimizer.lr=0.001") == "3_arch=fcn16s,optimizer.lr=0.001"
    assert job_dir(0, "") == "0"  # nothing varies (a sweep of one value)
    assert job_dir(1, "data.root=/data/x,arch.init_from=C:\\a.ckpt") == (
        "1_data.root=_data_x,arch.init_from=C:_a.ckpt"
    )
    long = [job_dir(n, "optimizer.lr=0.001," + "x" * 300) for n in (7, 12)]
    assert all(len(n) == MAX_NAME and n.endswith("...") for n in long)
    assert long[0].startswith("7_optimizer.lr=0.001,xx") and long[1].startswith("12_optimizer")
    assert job_dir(7, "a=1") == job_dir(7, "a=1")  # a resumed sweep finds its folders


def test_job_folders_named_by_their_overrides_are_found_in_number_order(tmp_path):
    make_job(tmp_path, "10_optimizer.lr=0.1", ["optimizer.lr=0.1"], METRICS)
    make_job(tmp_path, "2_optimizer.lr=0.2", ["optimizer.lr=0.2"], METRICS)
    make_job(tmp_path, "3", [], METRICS)  # a sweep from before the names
    (tmp_path / "x_1").mkdir()  # not numbered first: not a job
    (tmp_path / "x_1" / "run.json").write_text("{}")
    assert names(tmp_path) == ["2_optimizer.lr=0.2", "3", "10_optimizer.lr=0.1"]
    assert [j["job"] for j in (sweep_end(tmp_path).jobs or [])] == ["2", "3", "10"]


def job(number: str, miou: float | None, status: str = "finished") -> dict:
    metrics = {} if miou is None else {"fcn32s": {"mIoU": 0.9}, "fcn16s": {"mIoU": miou}}
    return {"job": number, "overrides": [], "metrics": metrics, "status": status, "reason": None}


def test_best_names_one_job_or_a_tie_as_written():
    # the last stage's mIoU counts; equal to 3 decimals (the table's 0.1 %) is a tie
    jobs = [job("0", 0.12341), job("1", 0.5, "failed"), job("2", 0.12339), job("3", 0.1)]
    assert best(jobs) == "tie between jobs 0, 2 (val mIoU 0.123)"
    assert best([*jobs, job("4", 0.1236)]) == "best: job 4 (val mIoU 0.124)"
    assert best([job("0", 0.2), job("1", 0.2), job("2", 0.2)]) == (
        "tie between jobs 0, 1, 2 (val mIoU 0.200)"
    )
    assert best([job("0", None), job("1", 0.3, "interrupted")]) is None


def test_summary_reports_a_tie_in_its_file_and_on_the_console(tmp_path, capsys):
    make_job(tmp_path, "0_optimizer.lr=1", ["optimizer.lr=1"], METRICS)
    make_job(tmp_path, "1_optimizer.lr=2", ["optimizer.lr=2"], METRICS)
    make_job(tmp_path, "2_optimizer.lr=3", ["optimizer.lr=3"])
    sweep_end(tmp_path)
    line = "tie between jobs 0, 1 (val mIoU 0.500)"
    assert (tmp_path / "summary.txt").read_text().splitlines()[-1] == line
    assert line in capsys.readouterr().out


def sweep_config(overrides: list[str], swept: str | None = None, params=(), drop=()):
    """train.py's config for ``-m hparams_search=optuna <overrides> <swept>``, Hydra's node
    included, with ``params`` searched besides the preset's and the ``drop`` ones not."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["hparams_search=optuna", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task += [swept] if swept else []  # as Hydra leaves a sweep's values
        cfg.hydra.sweeper.params.update(dict(params))
        for key in drop:
            del cfg.hydra.sweeper.params[key]
    return cfg


@pytest.mark.parametrize(
    ("overrides", "idle", "why"),
    [
        (["arch=fcn32s"], ["stages.fcn16s.lr_factor", "stages.fcn8s.lr_factor"],
         "arch=fcn32s trains one stage"),
        (["arch=fcn8s_atonce"], ["stages.fcn16s.lr_factor", "stages.fcn8s.lr_factor"],
         "arch=fcn8s_atonce trains one stage"),
        (["arch=fcn8s", "staged=false"], ["stages.fcn16s.lr_factor", "stages.fcn8s.lr_factor"],
         "arch=fcn8s staged=false trains one stage"),
        (["arch=fcn16s"], ["stages.fcn8s.lr_factor"], "arch=fcn16s trains fcn32s, fcn16s"),
        (["arch=fcn8s"], [], ""),
        (["arch=fcn16s", "arch.init_from=/runs/a/fcn32s/checkpoints/best.ckpt"],
         ["stages.fcn8s.lr_factor"], "arch=fcn16s trains one stage, from arch.init_from"),
        # the search, or the sweep, varies the stages: every param kept
        (["arch=fcn32s", {"arch": "choice(fcn32s, fcn8s)"}], [], ""),
        (["arch=fcn32s", "staged=choice(true,false)"], [], ""),
    ],
)  # fmt: skip
def test_optuna_searches_only_keys_acting_on_the_trained_stages(overrides, idle, why, capsys):
    params = [o for o in overrides if isinstance(o, dict)]
    swept = [o for o in overrides if isinstance(o, str) and "(" in o]
    fixed = [o for o in overrides if isinstance(o, str) and "(" not in o]
    config = sweep_config(fixed, *swept, params=params[0] if params else {})
    before = list(config.hydra.sweeper.params)
    OptunaScope().on_multirun_start(config)
    assert list(config.hydra.sweeper.params) == [k for k in before if k not in idle]
    said = capsys.readouterr().out
    assert said == (f"optuna: not searching {', '.join(idle)}: {why}\n" if idle else "")


def test_optuna_with_nothing_left_to_search_is_refused_naming_the_keys():
    config = sweep_config(["arch=fcn32s"], drop=["optimizer.lr", "optimizer.weight_decay"])
    with pytest.raises(SystemExit, match=r"^Error: .*nothing left to search: "
                       r"stages.fcn16s.lr_factor, stages.fcn8s.lr_factor do nothing"):  # fmt: skip
        OptunaScope().on_multirun_start(config)
