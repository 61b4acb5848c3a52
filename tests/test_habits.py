"""Habits of real users: Ctrl+C, a full disk, no progress bar, DDP on CPUs, odd solver input."""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers import RESUMABLE, TINY, cfg_of, final_state

from fcn_lightning.app.callbacks import AtomicCheckpointIO
from fcn_lightning.app.train import train
from fcn_lightning.errors import ConfigError, RunInterrupted
from fcn_lightning.module import FCNModule

MODEL = {"arch": "fcn32s", "num_classes": 3, "width": 0.0625, "geometry": "same"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """RESUMABLE's run, never interrupted: 2 epochs of 4 steps."""
    out = tmp_path_factory.mktemp("straight")
    train(cfg_of("config", RESUMABLE, out))
    return out


# mid-epoch (2 of epoch 1's 4 steps done), and between epochs with loader processes (their
# first batches are drawn before Lightning sets the epoch: epoch 1's, not epoch 0's again)
@pytest.mark.parametrize("step, workers", [(6, 0), (4, 2)])
def test_ctrl_c_stops_after_the_step_and_resumes_exactly(step, workers, straight, tmp_path):
    out = tmp_path / "stopped"
    ctrl_c = ["+callbacks.stop._target_=interrupts.CtrlCAtStep", f"+callbacks.stop.step={step}"]
    with pytest.raises(RunInterrupted) as stop:
        train(cfg_of("config", [*RESUMABLE, *ctrl_c, f"data.num_workers={workers}"], out))
    message = str(stop.value)
    assert f"interrupted (Ctrl+C) at epoch 1, step {step}" in message
    assert f"resume=true hydra.run.dir={out}" in message and "last.ckpt holds that step" in message
    ckpt = torch.load(out / "fcn32s/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step  # at the end of a whole step
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    train(cfg_of("config", [*RESUMABLE, "resume=true", f"data.num_workers={workers}"], out))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    a, b = final_state(straight), final_state(out)  # as if never interrupted
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_ctrl_c_twice_stops_at_once_and_keeps_the_last_whole_checkpoint(tmp_path):
    ctrl_c = ["+callbacks.stop._target_=interrupts.CtrlCAtStep", "+callbacks.stop.step=6"]
    with pytest.raises(
        RunInterrupted, match=r"stopped at once \(Ctrl\+C twice\)[\s\S]*holds step 4"
    ):
        train(cfg_of("config", [*RESUMABLE, *ctrl_c, "+callbacks.stop.times=2"], tmp_path))
    assert (
        torch.load(tmp_path / "fcn32s/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    )


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "run" / "fcn32s" / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"part of a checkpoint")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed"
        )

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError,
        match=r"no space left on the device while writing .*last.ckpt[\s\S]*resume=true hydra.run.dir=.*run\b[\s\S]*previous checkpoint is kept",
    ) as err:
        io.save_checkpoint({"step": 2}, path)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_too_little_disk_for_the_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"has 0 MiB free; fcn32s's checkpoints need about"):
        train(cfg_of("config", [*TINY, "arch=fcn32s"], tmp_path))
    assert not list(tmp_path.glob("fcn32s/checkpoints/*.ckpt"))


def test_training_without_a_progress_bar(tmp_path):
    # the default callbacks hold a progress bar that Lightning refuses to keep when it is off
    overrides = [o for o in TINY if o != "callbacks=none"]
    train(
        cfg_of("config", [*overrides, "arch=fcn32s", "trainer.enable_progress_bar=false"], tmp_path)
    )
    assert (tmp_path / "metrics.json").is_file()


def test_ddp_preset_on_cpu_keeps_batch_norm_per_process(tmp_path, caplog):
    from fcn_lightning.app.checks import check_settings
    from fcn_lightning.app.stages import trainer_settings

    cfg = cfg_of("config", ["trainer=ddp", "trainer.accelerator=cpu"])
    assert cfg.trainer.sync_batchnorm and cfg.arch.backbone == "vgg16_bn"
    with caplog.at_level("WARNING", logger="fcn_lightning"):
        check_settings(cfg)  # said once before any work, not once per stage
        assert trainer_settings(cfg, "fcn32s").sync_batchnorm is False
    assert "works on GPUs only" in caplog.text
    assert caplog.text.count("works on GPUs only") == 1
    if torch.cuda.is_available():
        gpu = cfg_of("config", ["trainer=ddp"])
        assert trainer_settings(gpu, "fcn32s").sync_batchnorm is True


@pytest.mark.parametrize(
    "optimizer,message",
    [
        (
            {"name": "adam", "lr": 1e-3},
            r"optimizer.name must be one of \('sgd', 'adamw'\), got 'adam'",
        ),
        ({"name": "sgd", "lr": 0}, r"optimizer.lr must be a positive number, got 0"),
        ({"name": "sgd"}, r"optimizer.lr must be a number"),
        ({"name": "sgd", "lr": "fast"}, r"optimizer.lr must be a number, got 'fast'"),
        (
            {"name": "sgd", "lr": 1e-3, "betas": [0.9, 0.99]},
            r"optimizer.betas is not a setting of SGD",
        ),
    ],
)
def test_module_refuses_a_bad_solver_when_built_not_at_fit(optimizer, message):
    with pytest.raises(ValueError, match=message):
        FCNModule(MODEL, optimizer=optimizer)


def test_module_refuses_an_unknown_scheduler_when_built():
    with pytest.raises(ValueError, match=r"scheduler.name must be one of"):
        FCNModule(MODEL, scheduler={"name": "plateau"})


def test_lowest_allowed_torch_loads_checkpoints_safely():
    # torch.load(weights_only=True) could still run code before torch 2.6
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in text


def test_last_checkpoint_is_where_the_stage_ended_after_a_resume(tmp_path):
    # 3 steps in an epoch of 4: no epoch end, no validation during fit
    short = [*RESUMABLE, "trainer.max_steps=3", "trainer.check_val_every_n_epoch=10"]
    kill = ["+callbacks.kill._target_=interrupts.SigtermAtStep", "+callbacks.kill.step=1"]
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM"):
        train(cfg_of("config", [*short, *kill], tmp_path))
    train(cfg_of("config", [*short, "resume=true"], tmp_path))
    last = torch.load(tmp_path / "fcn32s/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 3
