"""Interruption and exact resume, atomic checkpoints, non-finite losses, DDP metrics, a
bad-input table over data, config and checkpoints, and a local submitit sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_app import NO_DATA, ROOT, TINY, cfg_of, run

from fcn_lightning.callbacks import AtomicCheckpointIO
from fcn_lightning.pipeline import evaluate, train
from fcn_lightning.prediction import predict

# 16 images of 32 px, batch 4: 4 steps an epoch, 2 epochs; dropout on so the random state matters
RESUMABLE = [o for o in TINY if not o.startswith(("trainer.max_steps", "data.train_size"))] + [
    "arch=fcn32s", "data.train_size=16", "trainer.max_steps=8", "trainer.deterministic=true", "arch.dropout=0.5",
]  # fmt: skip


def final_state(out: Path, stage: str = "fcn32s") -> dict[str, torch.Tensor]:
    return torch.load(out / stage / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    train(cfg_of("config", RESUMABLE, straight))
    killed = tmp_path / "killed"
    with pytest.raises(
        SystemExit, match=r"stopped by SIGTERM at epoch 1, step 6;[\s\S]*resume=true"
    ):
        train(
            cfg_of(
                "config",
                [
                    *RESUMABLE,
                    "+callbacks.kill._target_=interrupts.SigtermAtStep",
                    "+callbacks.kill.step=6",
                ],
                killed,
            )
        )
    ckpt = torch.load(killed / "fcn32s/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # mid-epoch: 2 of epoch 1's 4 steps
    train(cfg_of("config", [*RESUMABLE, "resume=true"], killed))
    a, b = final_state(straight), final_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    assert json.loads((straight / "metrics.json").read_text()) == json.loads(
        (killed / "metrics.json").read_text()
    )


def test_staged_run_killed_in_16s_resumes_16s_without_retraining_32s(tmp_path, caplog):
    overrides = [*RESUMABLE, "arch=fcn16s"]
    with pytest.raises(SystemExit, match="fcn16s stopped by SIGTERM"):
        train(
            cfg_of(
                "config",
                [
                    *overrides,
                    "+callbacks.kill._target_=interrupts.SigtermAtStep",
                    "+callbacks.kill.step=3",
                    "+callbacks.kill.stage=fcn16s",
                ],
                tmp_path,
            )
        )
    best32 = tmp_path / "fcn32s/checkpoints/best.ckpt"
    stamp = best32.stat().st_mtime_ns
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == ["fcn32s"]
    with caplog.at_level("INFO", logger="fcn_lightning"):
        train(cfg_of("config", [*overrides, "resume=true"], tmp_path))
    assert best32.stat().st_mtime_ns == stamp
    assert "fcn32s: finished before, skipped" in caplog.text
    assert "resuming" in caplog.text and "fcn16s/checkpoints/last.ckpt" in caplog.text
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == ["fcn32s", "fcn16s"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def killed_while_writing(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, intact


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_good_checkpoint(tmp_path):
    cfg = cfg_of(
        "config",
        [
            *RESUMABLE,
            "+callbacks.poison._target_=interrupts.PoisonAtStep",
            "+callbacks.poison.step=5",
        ],
        tmp_path,
    )
    with pytest.raises(
        SystemExit,
        match=r"training loss is (nan|inf) at epoch 1, step 5 \(batch 1\)[\s\S]*last good checkpoint is kept",
    ):
        train(cfg)
    ckpt = torch.load(tmp_path / "fcn32s/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # the end of epoch 0, before the weights went bad
    assert all(
        torch.isfinite(v).all()
        for v in ckpt["state_dict"].values()
        if torch.is_tensor(v) and v.is_floating_point()
    )


def test_resume_into_a_different_config_names_both_sides(tmp_path):
    with pytest.raises(SystemExit):
        train(
            cfg_of(
                "config",
                [
                    *RESUMABLE,
                    "+callbacks.kill._target_=interrupts.SigtermAtStep",
                    "+callbacks.kill.step=2",
                ],
                tmp_path,
            )
        )
    with pytest.raises(ValueError, match=r"width: checkpoint 0.0625 vs model 0.125"):
        train(cfg_of("config", [*RESUMABLE, "resume=true", "arch.width=0.125"], tmp_path))


def test_ddp_validation_metrics_equal_single_process(tmp_path):
    for devices in (1, 2):
        result = run(
            "tests/ddp_validate.py", str(devices), str(tmp_path / f"{devices}.json"), cwd=ROOT
        )
        assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "1.json").read_text())
    two = json.loads((tmp_path / "2.json").read_text())
    assert one == two  # to the last digit: every image counted once, confusion matrices summed
    assert 0 < one["mIoU"] < 1


def test_cli_ddp_two_cpu_processes_write_one_run_folder(tmp_path):
    overrides = [o for o in TINY if not o.startswith(("data.train_size", "data.batch_size"))]
    result = run("train.py", "arch=fcn16s", *overrides, "data.train_size=8", "data.batch_size=2", "trainer.devices=2",
                 "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # not one folder per process
    assert list(json.loads((tmp_path / "run" / "metrics.json").read_text())) == ["fcn32s", "fcn16s"]
    assert sorted(p.name for p in (tmp_path / "run" / "tensorboard").iterdir()) == [
        "fcn16s",
        "fcn32s",
    ]


# --------------------------------------------------------------------------- bad input table
def _ckpt(tmp_path: Path) -> Path:
    out = tmp_path / "trained"
    if not (out / "fcn32s/checkpoints/best.ckpt").is_file():
        train(cfg_of("config", [*TINY, "arch=fcn32s"], out))
    return out / "fcn32s/checkpoints/best.ckpt"


def _write_voc_missing_image(tmp_path):
    from dataset_writers import write_voc

    write_voc(tmp_path / "voc", 2012, {"train": ["a", "b"], "val": ["c"]})
    (tmp_path / "voc/VOCdevkit/VOC2012/JPEGImages/b.jpg").unlink()
    return tmp_path / "voc"


BAD = {
    "voc root missing": (
        lambda t: ("train", ["data=voc", f"data.root={t / 'none'}", *NO_DATA]),
        r"data.root .*none does not exist[\s\S]*VOCdevkit",
    ),
    "voc root unset": (lambda t: ("train", ["data=voc", *NO_DATA]), r"data.root"),
    "split lists a missing image": (
        lambda t: (
            "train",
            [
                "data=voc",
                f"data.root={_write_voc_missing_image(t)}",
                "data.year=2012",
                "data.train_split=train",
                "data.val_split=val",
                *NO_DATA,
            ],
        ),
        r"split 'train' lists 'b' but .*b.jpg does not exist",
    ),
    "sbd missing for sbd_train": (
        lambda t: (
            "train",
            [
                "data=voc",
                f"data.root={_write_voc_missing_image(t)}",
                "data.year=2012",
                "data.val_split=val",
                *NO_DATA,
            ],
        ),
        r"SBD \(benchmark_RELEASE/dataset\) not found[\s\S]*benchmark.tgz",
    ),
    "seg11valid on VOC2012": (
        lambda t: (
            "train",
            [
                "data=voc",
                f"data.root={_write_voc_missing_image(t)}",
                "data.year=2012",
                "data.train_split=train",
                *NO_DATA,
            ],
        ),
        r"seg11valid is VOC2011 val minus SBD train: set data.year=2011",
    ),
    "unknown voc split": (
        lambda t: ("train", ["data=voc", "data.root=/x", "data.train_split=everything", *NO_DATA]),
        r"unknown VOC split 'everything'",
    ),
    "folder without class count": (
        lambda t: ("train", ["data=folder", f"data.root={t}", *NO_DATA]),
        r"JPEGImages not found|number of classes is unknown",
    ),
    "nyud unknown modality": (
        lambda t: ("train", ["data=nyud", "data.root=/x", "data.modality=thermal", *NO_DATA]),
        r"data.modality must be one of",
    ),
    "batching whole with batch 8": (
        lambda t: ("train", [*TINY, "data.batching=whole", "data.batch_size=8"]),
        r"data.batching=whole .* data.batch_size=1",
    ),
    "unknown batching": (
        lambda t: ("train", [*TINY, "data.batching=tiles"]),
        r"data.batching must be one of",
    ),
    "geometry typo": (
        lambda t: ("train", [*TINY, "arch.geometry=sideways"]),
        r"geometry must be one of \('paper', 'same'\), got 'sideways'",
    ),
    "zero width": (lambda t: ("train", [*TINY, "arch.width=0"]), r"width must be > 0"),
    "unknown optimizer": (
        lambda t: ("train", [*TINY, "optimizer.name=rmsprop"]),
        r"optimizer.name must be one of",
    ),
    "sgd setting on adamw": (
        lambda t: ("train", [*TINY, "+optimizer.momentum=0.9"]),
        r"optimizer.momentum is not a setting of AdamW",
    ),
    "loss reduction typo": (
        lambda t: ("train", [*TINY, "loss.reduction=median"]),
        r"loss_reduction must be 'mean' or 'sum'",
    ),
    "pretrained file missing": (
        lambda t: ("train", [*TINY, f"arch.pretrained={t / 'vgg.pth'}"]),
        r"pretrained weights file not found: .*vgg.pth",
    ),
    "init_from missing": (
        lambda t: ("train", [*TINY, f"arch.init_from={t / 'x.ckpt'}"]),
        r"arch.init_from: checkpoint not found: .*x.ckpt",
    ),
    "init_streams without fusion": (
        lambda t: (
            "train",
            [*TINY, "staged=false", f"+arch.init_streams={{rgb: {_ckpt(t)}, hha: {_ckpt(t)}}}"],
        ),
        r"arch.init_streams needs a late-fusion model",
    ),
    "eval ckpt missing": (
        lambda t: ("eval", [f"ckpt_path={t / 'nope.ckpt'}"]),
        r"ckpt_path: checkpoint not found: .*nope.ckpt",
    ),
    "eval ckpt not ours": (
        lambda t: ("eval", [f"ckpt_path={_not_ours(t)}"]),
        r"is not a checkpoint written by fcn-lightning",
    ),
    "eval with other classes": (
        lambda t: ("eval", [f"ckpt_path={_ckpt(t)}", "data=nyud", f"data.root={_nyud(t)}"]),
        r"predicts \{'out': 5\} classes but .* has \{'out': 40\}",
    ),
    "predict input missing": (
        lambda t: ("predict", [f"ckpt_path={_ckpt(t)}", f"input={t / 'photos'}", f"output={t}"]),
        r"input not found: .*photos",
    ),
}


def _not_ours(tmp_path: Path) -> Path:
    path = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(1)}, path)
    return path


def _nyud(tmp_path: Path) -> Path:
    from dataset_writers import write_nyud

    return write_nyud(tmp_path / "nyud", {"train": ["1"], "val": ["2"], "test": ["3"]})


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_table(tmp_path, case):
    make, message = BAD[case]
    entry, overrides = make(tmp_path)
    cfg = cfg_of(
        {"train": "config", "eval": "eval", "predict": "predict"}[entry],
        overrides,
        tmp_path / "run",
    )
    fn = {"train": train, "eval": evaluate, "predict": predict}[entry]
    with pytest.raises(Exception, match=message):
        fn(cfg)
    if entry == "train":  # failed before any training
        assert not list((tmp_path / "run").glob("fcn*/checkpoints/*.ckpt"))


def test_local_submitit_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run("train.py", "-m", "hydra/launcher=local", "hydra.launcher.cpus_per_task=1", "arch=fcn32s",
                 "optimizer.lr=1e-3,1e-4", *TINY, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "0" / "metrics.json").is_file() and (
        tmp_path / "1" / "metrics.json"
    ).is_file()
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 2


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.signal_delay_s == 120
    assert "SlurmLauncher" in cfg.hydra.launcher._target_


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_resumable_sampler_skips_only_in_the_resumed_epoch():
    from fcn_lightning.data.base import ResumableSampler

    sampler = ResumableSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(i for _, i in full) == list(range(10)) and {e for e, _ in full} == {2}
    assert list(sampler) == full  # the order is a function of (seed, epoch)
    sampler.resume_at(2, 4)
    assert len(sampler) == 6 and list(sampler) == full[4:]
    assert list(sampler) == full  # only once
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_datamodule_ignores_resume_state_outside_fit():
    from fcn_lightning.data import SyntheticDataModule

    dm = SyntheticDataModule(train_size=8, image_size=16, batch_size=2)
    dm.load_state_dict({"epoch": 0, "samples_done": 4})  # e.g. restored by validate(ckpt_path=...)
    assert len(dm.train_dataloader().sampler) == 8
