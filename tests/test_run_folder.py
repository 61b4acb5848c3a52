"""A run owns its folder: reuse, resume, races, SLURM requeues, and Hydra's record of a run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONF, RESUMABLE, ROOT, TINY, cfg_of, final_state
from helpers.launcher import cli, commands  # train.py commands in processes that skip the imports
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from fcn_lightning.app import rundir
from fcn_lightning.app.common import as_command
from fcn_lightning.app.train import RunInterrupted, train
from fcn_lightning.errors import RunFolderError

# RESUMABLE in half the steps, in the same shape: two epochs (2 steps each), each validated
HALF = [*RESUMABLE, "data.train_size=8", "trainer.max_steps=4"]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def guarded(overrides: list[str], run_dir: Path | None = None):
    """The config of ``python train.py <overrides>`` after Hydra's callback has claimed its run
    folder (``hydra.run.dir``, or Hydra's default under the working directory) as Hydra calls
    it, before Hydra writes ``.hydra/``; a refusal is the SystemExit the command ends with."""
    GlobalHydra.instance().clear()
    where = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[*overrides, *where], return_hydra_config=True
        )
    try:
        rundir.RunFolderGuard().on_run_start(cfg)
    except SystemExit:
        rundir.release()
        raise
    with open_dict(cfg):
        cfg.paths.output_dir = OmegaConf.select(cfg, "hydra.run.dir")
    return cfg


@pytest.fixture(scope="module")
def finished(tiny_run32) -> Path:
    return tiny_run32  # [*TINY, "arch=fcn32s"], trained once per test process: copy it to change it


@pytest.mark.parametrize(
    "overrides", [[], ["debug=fdr"], ["trainer.max_steps=3"]], ids=["same", "fdr", "longer"]
)
def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(finished, overrides):
    before = snapshot(finished)
    with pytest.raises(
        RunFolderError, match=r"already holds a run[\s\S]*resume=true hydra.run.dir="
    ):
        train(cfg_of("config", [*TINY, "arch=fcn32s", *overrides], finished))
    assert snapshot(finished) == before  # metrics.json, best.ckpt, run.json: untouched


def test_run_record_says_how_the_run_went(finished):
    record = json.loads((finished / "run.json").read_text())
    assert record["status"] == "finished" and 0 <= record["mIoU"] <= 1
    assert record["started"] and record["argv"]


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_with_nothing_to_resume_says_where_it_looked(tmp_path, finished, where):
    out = tmp_path / "outputs" / "2026-11-29" / "17-00-0"  # e.g. a mistyped folder
    if where == "empty":
        out.mkdir(parents=True)
    sibling = tmp_path / "outputs" / "2026-11-29" / "17-00-00"
    sibling.mkdir(parents=True)
    (sibling / "run.json").write_text((finished / "run.json").read_text())
    with pytest.raises(RunFolderError, match=r"nothing to resume in .*17-00-0\b[\s\S]*17-00-00"):
        train(cfg_of("config", [*TINY, "arch=fcn32s", "resume=true"], out))
    assert not (out / "fcn32s").exists() and not (out / "run.json").exists()


def test_command_line_resume_without_a_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Hydra's default folder: a new one under ./outputs
    with pytest.raises(SystemExit, match="^Error: resume=true, but there is nothing to resume"):
        guarded(["arch=fcn32s", *TINY, "resume=true"])
    assert not list(tmp_path.glob("outputs/*/*/*"))


def test_a_run_that_saved_nothing_leaves_its_folder_usable(tmp_path):
    # a setting found wrong once the data is known (a bad one is refused before the claim)
    with pytest.raises(ValueError, match="class_weights"):
        train(cfg_of("config", [*TINY, "arch=fcn32s", "loss.class_weights=[1.0,2.0]"], tmp_path))
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
    train(cfg_of("config", [*TINY, "arch=fcn32s"], tmp_path))  # fixed and run again: fine
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record = {"run_id": "x", "status": "running", "pid": other.pid, "started": "now"}
        (tmp_path / "run.json").write_text(json.dumps({**record, "host": os.uname().nodename}))
        with pytest.raises(RunFolderError, match=rf"in use by a running run \(pid {other.pid}"):
            rundir.claim(tmp_path, resume=False)
    finally:
        other.kill()
        other.wait()
    assert rundir.claim(tmp_path, resume=False) is False  # its process is gone: a stale record
    rundir.release()


def test_two_claims_of_one_folder_one_wins(tmp_path):
    assert rundir.claim(tmp_path, resume=False) is False
    first = os.environ[rundir.ENV_ID]
    rundir.release()
    (tmp_path / "metrics.json").write_text("{}")  # the first run has saved something
    with pytest.raises(RunFolderError, match="already holds a run"):
        rundir.claim(tmp_path, resume=False)
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == first


def test_slurm_requeue_resumes_its_own_folder_by_itself(tmp_path, monkeypatch, caplog):
    straight = tmp_path / "straight"
    train(cfg_of("config", HALF, straight))
    job = tmp_path / "job"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    kill = ["+callbacks.kill._target_=interrupts.SigtermAtStep", "+callbacks.kill.step=3"]
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM"):
        train(cfg_of("config", [*HALF, *kill], job))
    assert json.loads((job / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued: resume=false
    with caplog.at_level("INFO", logger="fcn_lightning"):
        train(cfg_of("config", HALF, job))
    assert "SLURM requeued job 4242" in caplog.text and "resuming" in caplog.text
    a, b = final_state(straight), final_state(job)
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    # another SLURM job in that folder is another run
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(cfg_of("config", HALF, job))


# --------------------------------------------------------------------------- command line
def test_cli_refusals_keep_the_runs_hydra_record(tmp_path):
    out = tmp_path / "run"
    base = [*HALF, f"hydra.run.dir={out}"]
    kill = ["+callbacks.kill._target_=interrupts.SigtermAtStep", "+callbacks.kill.step=1"]
    killed = cli(*base, *kill, cwd=tmp_path)
    assert killed.returncode == 143, killed.stderr[-2000:]  # 128 + SIGTERM, as a shell says
    printed = shlex.split(re.search(r"Continue with: (.*)", killed.stderr).group(1))
    script = str(ROOT / "train.py")  # as it was started
    assert printed == ["python", script, *HALF, *kill, "resume=true", f"hydra.run.dir={out}"]
    record = (out / ".hydra" / "overrides.yaml").read_text()
    before = snapshot(out)
    again = cli(*base, "optimizer.lr=0.1", cwd=tmp_path)  # same folder, no resume
    assert again.returncode != 0 and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr
    assert snapshot(out) == before  # not even .hydra/ was rewritten
    with pytest.raises(SystemExit, match=r"^Error: [\s\S]*arch.width: 0.0625 -> 0.125"):
        guarded([*HALF, "arch.width=0.125", "resume=true"], out)
    assert snapshot(out) == before  # refused before Hydra wrote anything
    resumed = cli(*printed[2:], "data.num_workers=0", cwd=tmp_path)  # the command it printed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Checkpoint directory" not in resumed.stderr  # Lightning's warning: a resume's own
    assert (out / ".hydra" / "overrides.yaml").read_text() == record  # how the run was made
    assert "resume=true" in (out / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_command_line_run_refused_by_a_setting_records_why(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = guarded(["arch=fcn32s", *TINY, "arch.init_from=/nowhere/x.ckpt"], out)
    try:
        with pytest.raises(SystemExit) as stop:
            as_command(train, cfg)
    finally:
        rundir.release()
    said = capsys.readouterr().err + str(stop.value.code)  # the message: printed, or the exit's
    assert stop.value.code not in (0, None)
    assert "Error: arch.init_from: checkpoint not found" in said
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "arch.init_from" in record["reason"]  # not "running"
    assert not (out / "fcn32s").exists()


def test_cli_runs_started_together_get_their_own_folders(tmp_path):
    command = [ROOT / "train.py", "arch=fcn32s", *TINY]
    results = [(p.returncode, p.stderr) for p in commands(command, command, cwd=tmp_path)]
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    folders = sorted(tmp_path.glob("outputs/*/*"))
    assert len(folders) == 2 and all((f / "metrics.json").is_file() for f in folders)


def test_resume_with_other_settings_is_refused_naming_them(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.raises(
        RunFolderError, match=r"data.image_size: 32 -> 48\s+optimizer.lr: 0.001 -> 0.5"
    ):
        train(
            cfg_of(
                "config",
                [*TINY, "arch=fcn32s", "resume=true", "optimizer.lr=0.5", "data.image_size=48"],
                out,
            )
        )
    with pytest.raises(RunFolderError, match=r"optimizer.name: adamw -> sgd"):
        train(cfg_of("config", [*TINY, "arch=fcn32s", "resume=true", "optimizer=sgd"], out))
    # where the data lives, how many workers load it, how long to train: may change
    train(
        cfg_of(
            "config",
            [*TINY, "arch=fcn32s", "resume=true", "data.num_workers=0", "trainer.max_steps=2"],
            out,
        )
    )


def test_cli_resumed_sweep_must_sweep_what_it_swept(tmp_path):
    sweep = [*TINY, "arch=fcn32s", f"hydra.sweep.dir={tmp_path}"]
    assert cli("-m", *sweep, "optimizer.lr=1e-3,1e-4", cwd=tmp_path).returncode == 0
    summary = (tmp_path / "summary.json").read_text()
    # the same command with other values, as Hydra's callback sees it before the jobs start
    task = [*TINY, "arch=fcn32s", "optimizer.lr=2e-3,1e-3", "resume=true"]
    other = OmegaConf.create(
        {"resume": True, "hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": task}}}
    )
    with pytest.raises(SystemExit, match=r"^Error: [\s\S]*optimizer.lr: 1e-3,1e-4 -> 2e-3,1e-3"):
        rundir.RunFolderGuard().on_multirun_start(other)
    assert (tmp_path / "summary.json").read_text() == summary  # nothing relabelled
    with open_dict(other):
        other.resume = False  # and without resume=true: the folder holds another sweep
    with pytest.raises(SystemExit, match=r"already holds the jobs of another sweep \(0\S*, 1\S*\)"):
        rundir.RunFolderGuard().on_multirun_start(other)
    same = cli("-m", *sweep, "optimizer.lr=1e-3,1e-4", "resume=true", cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "finished before, skipped" in same.stderr + same.stdout
