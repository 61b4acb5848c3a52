"""Interruption and exact resume, atomic checkpoints, non-finite losses, DDP metrics, a
bad-input table over data, config and checkpoints, and a local submitit sweep."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NO_DATA, RESUMABLE, ROOT, TINY, cfg_of, final_state
from helpers.launcher import cli, commands
from PIL import Image

from fcn_lightning.app.callbacks import AtomicCheckpointIO
from fcn_lightning.app.evaluate import evaluate
from fcn_lightning.app.predict import predict
from fcn_lightning.app.train import train
from fcn_lightning.errors import RunInterrupted, TrainingDiverged

# 16 images of 32 px, batch 4: 4 steps an epoch, 2 epochs; dropout on so the random state matters


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted RESUMABLE run the interrupted ones are compared with (deterministic:
    made once per test process, only read)."""
    out = tmp_path_factory.mktemp("straight")
    train(cfg_of("config", RESUMABLE, out))
    return out


@pytest.mark.xdist_group("reliability_straight")  # one worker computes the module fixture once
@pytest.mark.parametrize("epoch, step", [(1, 6), (0, 2)])  # mid-epoch, in the first one too
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, straight, epoch, step):
    killed = tmp_path / "killed"
    with pytest.raises(
        RunInterrupted,
        match=rf"stopped by SIGTERM at epoch {epoch}, step {step};[\s\S]*resume=true",
    ):
        train(
            cfg_of(
                "config",
                [
                    *RESUMABLE,
                    "+callbacks.kill._target_=interrupts.SigtermAtStep",
                    f"+callbacks.kill.step={step}",
                ],
                killed,
            )
        )
    ckpt = torch.load(killed / "fcn32s/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step and ckpt["epoch"] == epoch  # mid-epoch: 2 of its 4 steps
    train(cfg_of("config", [*RESUMABLE, "resume=true"], killed))
    a, b = final_state(straight), final_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    assert json.loads((straight / "metrics.json").read_text()) == json.loads(
        (killed / "metrics.json").read_text()
    )


SCHEDULES = {
    "fixed": ([], lambda t, total: 1.0),
    "poly": (["scheduler=poly"], lambda t, total: (1 - t / total) ** 0.9),
    "cosine": (["scheduler=cosine"], lambda t, total: (1 + math.cos(math.pi * t / total)) / 2),
    "poly after a warm-up": (
        ["scheduler=poly", "scheduler.warmup_steps=2", "scheduler.warmup_factor=0.1"],
        lambda t, total: 0.1 + 0.9 * t / 2 if t < 2 else (1 - (t - 2) / (total - 2)) ** 0.9,
    ),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_resume_with_a_longer_budget_follows_the_schedule_of_the_new_length(tmp_path, schedule):
    # stopped at step 3 of 6, resumed with 10: steps 3-9 train at the lr a 10-step run has there
    overrides, factor = SCHEDULES[schedule]
    out, lrs = tmp_path / "run", tmp_path / "lrs.jsonl"
    run = [*TINY, "arch=fcn32s", *overrides, "optimizer.lr=0.01",
           "+callbacks.lr._target_=interrupts.RecordLr", f"+callbacks.lr.path={lrs}"]  # fmt: skip
    kill = ["+callbacks.kill._target_=interrupts.SigtermAtStep", "+callbacks.kill.step=3"]
    with pytest.raises(RunInterrupted):
        train(cfg_of("config", [*run, *kill, "trainer.max_steps=6"], out))
    train(cfg_of("config", [*run, "trainer.max_steps=10", "resume=true"], out))
    used = [json.loads(line) for line in lrs.read_text().splitlines()]
    assert [step for step, _ in used] == list(range(10))  # each step once: none trained twice
    ratio = used[0][1][1] / used[0][1][0]  # the biases' lr factor
    for step, (weights, biases) in used:
        want = 0.01 * factor(step, 6 if step < 3 else 10)
        assert weights == pytest.approx(want, rel=1e-9, abs=1e-15), (step, weights, want)
        assert biases == pytest.approx(ratio * want, rel=1e-9, abs=1e-15)
    assert used[-1][1][0] > 0  # still learning at the last step


@pytest.mark.xdist_group("reliability_straight")  # one worker computes the module fixture once
@pytest.mark.parametrize("signal_callback", ["SigtermAtStep", "CtrlCAtStep"])
def test_interrupt_at_an_epoch_end_then_resume_equals_uninterrupted_run(
    tmp_path, straight, signal_callback
):
    # step 4 is the last of epoch 0 (4 steps per epoch): the stop lands on the epoch boundary
    killed = tmp_path / "killed"
    kill = [f"+callbacks.kill._target_=interrupts.{signal_callback}", "+callbacks.kill.step=4"]
    with pytest.raises(RunInterrupted, match=r"step 4;[\s\S]*resume=true"):
        train(cfg_of("config", [*RESUMABLE, *kill], killed))
    train(cfg_of("config", [*RESUMABLE, "resume=true"], killed))
    a, b = final_state(straight), final_state(killed)
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    ends = [
        torch.load(f / "fcn32s/checkpoints/last.ckpt", weights_only=True)
        for f in (straight, killed)
    ]
    assert [c["epoch"] for c in ends] == [ends[0]["epoch"]] * 2 and ends[1]["global_step"] == 8
    assert json.loads((straight / "metrics.json").read_text()) == json.loads(
        (killed / "metrics.json").read_text()
    )


def test_staged_run_killed_in_16s_resumes_16s_without_retraining_32s(tmp_path, caplog):
    overrides = [*RESUMABLE, "arch=fcn16s"]
    with pytest.raises(RunInterrupted, match="fcn16s stopped by SIGTERM"):
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
        TrainingDiverged,
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
    with pytest.raises(RunInterrupted):
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
    with pytest.raises(ValueError, match=r"arch.width: 0.0625 -> 0.125"):
        train(cfg_of("config", [*RESUMABLE, "resume=true", "arch.width=0.125"], tmp_path))
    record = json.loads((tmp_path / "run.json").read_text())
    del record["config"]  # a run made before run.json kept its config: the model says it
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"width: checkpoint 0.0625 vs model 0.125"):
        train(cfg_of("config", [*RESUMABLE, "resume=true", "arch.width=0.125"], tmp_path))


def test_ddp_validation_metrics_equal_single_process(tmp_path, monkeypatch):
    import ddp_validate

    with monkeypatch.context() as m:  # one process: this one
        m.setattr(sys, "argv", ["ddp_validate.py", "1", str(tmp_path / "1.json")])
        ddp_validate.main()
    # a process of its own, forked from helpers.launcher's server (train.py's imports done)
    (result,) = commands([ROOT / "tests/ddp_validate.py", "2", tmp_path / "2.json"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "1.json").read_text())
    two = json.loads((tmp_path / "2.json").read_text())
    assert one == two  # to the last digit: every image counted once, confusion matrices summed
    assert 0 < one["mIoU"] < 1


def test_cli_ddp_two_cpu_processes_write_one_run_folder(tmp_path):
    overrides = [o for o in TINY if not o.startswith(("data.train_size", "data.batch_size"))]
    result = cli("arch=fcn16s", *overrides, "data.train_size=8", "data.batch_size=2", "trainer=ddp",
                 "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    # trainer=ddp asks for sync batch norm, which works on GPUs only: off on the CPU
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # not one folder per process
    assert list(json.loads((tmp_path / "run" / "metrics.json").read_text())) == ["fcn32s", "fcn16s"]
    assert sorted(p.name for p in (tmp_path / "run" / "tensorboard").iterdir()) == [
        "fcn16s",
        "fcn32s",
    ]


# --------------------------------------------------------------------------- bad input table
# Each row: (make(case_dir, finished_run) -> (entry, overrides, out), message). Every row asserts
# its message, and that every file that existed before (the case's own files and a finished
# run's) is byte-identical afterwards: a refused command loses nothing already written.
@pytest.fixture(scope="module")
def finished_run(tiny_run32) -> Path:
    # [*TINY, "arch=fcn32s"], trained once per test process (test_run_folder's too): only read here
    return tiny_run32


def _ckpt(t: Path, run: Path) -> Path:
    return run / "fcn32s/checkpoints/best.ckpt"


def _copy_run(t: Path, run: Path, damage=None) -> Path:
    out = t / "copy"
    shutil.copytree(run, out)
    if damage:
        damage(out)
    return out


def _damaged_ckpt(t: Path, run: Path, how: str) -> Path:
    path = t / f"{how}.ckpt"
    data = _ckpt(t, run).read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    return path


class Planted:
    """Unpickling this runs code: it creates a file named by the test."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _planted(t: Path, run: Path, name: str = "planted.ckpt") -> Path:
    ckpt = torch.load(_ckpt(t, run), weights_only=True)
    ckpt["hyper_parameters"]["extra"] = Planted(t / "CODE_RAN")
    path = t / name
    torch.save(ckpt, path)
    return path


def _resume_from(t: Path, run: Path, damage) -> tuple[str, list[str], Path]:
    return "train", [*TINY, "arch=fcn32s", "resume=true"], _copy_run(t, run, damage)


def _unfinish(out: Path) -> None:
    (out / "metrics.json").unlink()  # the stage counts as unfinished: resume reads last.ckpt


def _plant_last(out: Path) -> None:
    _unfinish(out)
    last = out / "fcn32s/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["loops"] = {"planted": Planted(out.parent / "CODE_RAN")}
    torch.save(ckpt, last)


def _truncate(path: Path, empty: bool = False) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if empty else data[: len(data) // 2])


def _write_voc_missing_image(t):
    from helpers.datasets import write_voc

    write_voc(t / "voc", 2012, {"train": ["a", "b"], "val": ["c"]})
    (t / "voc/VOCdevkit/VOC2012/JPEGImages/b.jpg").unlink()
    return t / "voc"


def _write_voc(t: Path) -> Path:
    from helpers.datasets import write_voc

    return write_voc(t / "voc", 2012, {"train": ["a", "b"], "val": ["c"]})


def _voc_bad_label(t: Path, split: str, value: int) -> Path:
    root = _write_voc(t)
    name = {"train": "a", "val": "c"}[split]
    path = root / "VOCdevkit/VOC2012/SegmentationClass" / f"{name}.png"
    label = np.array(Image.open(path)).astype(np.uint16)
    label[0, 0] = value
    Image.fromarray(label).save(path)  # a 16-bit PNG when the value needs it
    return root


def _photos(t: Path) -> Path:
    folder = t / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _folder_rgb_labels(t: Path) -> Path:
    from helpers.datasets import write_folder

    root = write_folder(t / "mine", ["a", "b"], ["bg", "fg"])
    for name in ("a", "b"):
        label = root / "SegmentationClass" / f"{name}.png"
        Image.open(label).convert("RGB").save(label)  # a colour-coded mask, as many tools save
    return root


def _folder(t: Path, classes=("bg", "fg")) -> Path:
    from helpers.datasets import write_folder

    return write_folder(t / "mine", ["a", "b"], list(classes))


def _two_files(t: Path) -> Path:
    root = _folder(t)
    Image.open(root / "JPEGImages" / "a.jpg").save(root / "JPEGImages" / "a.png")
    return root


def _turned(t: Path) -> Path:
    root = _folder(t)
    for name in ("a", "b"):  # the photo stored on its side, the mask drawn upright
        path = root / "JPEGImages" / f"{name}.jpg"
        Image.open(path).transpose(Image.Transpose.ROTATE_90).save(path)
    return root


def _train(overrides: list[str]):
    return lambda t, r: ("train", overrides, t / "run")


VOC = ["data=voc", "data.year=2012", "data.train_split=train", "data.val_split=val"]
BAD = {
    # --- data
    "voc root missing": (
        lambda t, r: ("train", ["data=voc", f"data.root={t / 'none'}", *NO_DATA], t / "run"),
        r"data.root .*none does not exist[\s\S]*VOCdevkit",
    ),
    "voc root unset": (_train(["data=voc", *NO_DATA]), r"data.root"),
    "split lists a missing image": (
        lambda t, r: ("train", [*VOC, f"data.root={_write_voc_missing_image(t)}", *NO_DATA], t / "run"),
        r"split 'train' lists 'b' but .*b.jpg does not exist",
    ),
    "sbd missing for sbd_train": (
        lambda t, r: ("train", ["data=voc", f"data.root={_write_voc_missing_image(t)}", "data.year=2012",
                               "data.val_split=val", *NO_DATA], t / "run"),
        r"SBD \(benchmark_RELEASE/dataset\) not found[\s\S]*benchmark.tgz",
    ),
    "seg11valid on VOC2012": (
        lambda t, r: ("train", ["data=voc", f"data.root={_write_voc_missing_image(t)}", "data.year=2012",
                               "data.train_split=train", *NO_DATA], t / "run"),
        r"seg11valid is VOC2011 val minus SBD train: set data.year=2011",
    ),
    "unknown voc split": (
        _train(["data=voc", "data.root=/x", "data.train_split=everything", *NO_DATA]),
        r"unknown VOC split 'everything'",
    ),
    "folder without class count": (
        lambda t, r: ("train", ["data=folder", f"data.root={t}", *NO_DATA], t / "run"),
        r"JPEGImages not found|number of classes is unknown",
    ),
    "folder class count disagrees": (
        lambda t, r: ("train", ["data=folder", f"data.root={_folder(t)}", "+data.num_classes=3", *NO_DATA], t / "run"),
        r"data.num_classes=3 disagrees with the 2 classes in .*classes.txt",
    ),
    "folder with colour labels": (
        lambda t, r: ("train", ["data=folder", f"data.root={_folder_rgb_labels(t)}", "arch.pretrained=null", "arch.backbone=vgg16_bn", *NO_DATA], t / "run"),
        r"label .*a.png is a RGB image; labels must be palette",
    ),
    "label out of range in the val split": (
        lambda t, r: ("train", [*VOC, f"data.root={_voc_bad_label(t, 'val', 40)}", "arch.pretrained=null", "arch.backbone=vgg16_bn", *NO_DATA], t / "run"),
        r"split 'val'[\s\S]*c.png[\s\S]*40",
    ),
    "16-bit label over 255": (
        lambda t, r: ("train", [*VOC, f"data.root={_voc_bad_label(t, 'train', 300)}", "arch.pretrained=null", "arch.backbone=vgg16_bn", *NO_DATA], t / "run"),
        r"a.png[\s\S]*300",
    ),
    "label_map to a value out of range": (
        lambda t, r: ("train", [*VOC, f"data.root={_write_voc(t)}", "data.label_map={255: 30}", "arch.pretrained=null", "arch.backbone=vgg16_bn", *NO_DATA], t / "run"),
        r"30",
    ),
    "folder image id with two files": (
        lambda t, r: ("train", ["data=folder", f"data.root={_two_files(t)}", "arch.pretrained=null", "arch.backbone=vgg16_bn", *NO_DATA], t / "run"),
        r"image id 'a' has 2 files: .*a.jpg, .*a.png",
    ),
    "folder label turned by 90 degrees": (
        lambda t, r: ("train", ["data=folder", f"data.root={_turned(t)}", "arch.pretrained=null", "arch.backbone=vgg16_bn", "data.batching=whole", "data.batch_size=1", *NO_DATA], t / "run"),
        r"turned by 90 degrees[\s\S]*EXIF orientation",
    ),
    "nyud root missing": (
        _train(["data=nyud", "data.root=/nowhere/nyud", *NO_DATA]),
        r"data.root /nowhere/nyud does not exist",
    ),
    "siftflow root missing": (
        _train(["data=siftflow", "data.root=/nowhere/sift", *NO_DATA]),
        r"data.root /nowhere/sift does not exist",
    ),
    "nyud unknown modality": (
        _train(["data=nyud", "data.root=/x", "data.modality=thermal", *NO_DATA]),
        r"data.modality must be one of",
    ),
    "batching whole with batch 8": (
        _train([*TINY, "data.batching=whole", "data.batch_size=8"]),
        r"data.batching=whole .* data.batch_size=1",
    ),
    "unknown batching": (_train([*TINY, "data.batching=tiles"]), r"data.batching must be one of"),
    # --- model and solver
    "geometry typo": (
        _train([*TINY, "arch.geometry=sideways"]),
        r"geometry must be one of \('paper', 'same'\), got 'sideways'",
    ),
    "zero width": (_train([*TINY, "arch.width=0"]), r"width must be > 0"),
    "caffe normalisation on GoogLeNet": (
        _train([*TINY, "arch.backbone=googlenet", "arch.normalization=caffe"]),
        r"arch.normalization=caffe is for Caffe-converted VGG16 weights; arch.backbone=googlenet",
    ),
    "caffe normalisation on ResNet-101": (
        _train([*TINY, "arch.backbone=resnet101", "arch.normalization=caffe"]),
        r"arch.normalization=caffe is for Caffe-converted VGG16 weights; arch.backbone=resnet101",
    ),
    "ResNet dilated where the arch fuses its strides": (
        _train([*TINY, "arch=fcn8s", "arch.backbone=resnet50", "arch.output_stride=8"]),
        r"fcn16s on arch.backbone=resnet50, arch.output_stride=8, arch.geometry=same: fcn16s fuses the pool4 tap "
        r"\(stride 8\)",  # the staged chain's first stage that cannot be built
    ),
    "auxiliary head on a paper arch": (
        _train([*TINY, "arch=fcn8s", "arch.aux_weight=0.4"]),
        r"arch.aux_weight=0.4: the auxiliary head is fcn_torchvision's \(arch=fcn_torchvision\); fcn8s has",
    ),
    "negative auxiliary weight": (
        _train([*TINY, "arch=fcn_torchvision", "arch.aux_weight=-0.5"]),
        r"arch.aux_weight=-0.5: the auxiliary loss's weight must be >= 0",
    ),
    "pretrained file that torch.save did not write": (
        lambda t, r: ("train", [*TINY, "arch.backbone=resnet50", f"arch.pretrained={_text(t)}"], t / "run"),
        r"arch.pretrained: cannot read .*notes.pth \(KeyError: \d+\): not a file torch.save wrote",
    ),
    "caffe normalisation on GoogLeNet, as a list": (
        _train([*TINY, "arch.backbone=googlenet", "arch.normalization=[caffe]"]),
        r"arch.normalization=caffe is for Caffe-converted VGG16 weights; arch.backbone=googlenet",
    ),
    "unknown normalisation": (
        _train([*TINY, "arch.normalization=none"]),
        r"arch.normalization: unknown normalization 'none'; expected one of \['caffe', 'imagenet'\]",
    ),
    "caffe normalisation on AlexNet": (
        _train([*TINY, "arch.backbone=alexnet", "arch.normalization=caffe"]),
        r"arch.backbone=alexnet has torchvision's ImageNet weights only",
    ),
    "unknown optimizer": (
        _train([*TINY, "optimizer.name=rmsprop"]), r"optimizer.name must be one of"
    ),
    "sgd setting on adamw": (
        _train([*TINY, "+optimizer.momentum=0.9"]), r"optimizer.momentum is not a setting of AdamW"
    ),
    "lr zero": (_train([*TINY, "optimizer.lr=0"]), r"optimizer.lr must be a positive number, got 0"),
    "lr negative": (_train([*TINY, "optimizer.lr=-0.01"]), r"optimizer.lr must be a positive number"),
    "weight decay negative": (
        _train([*TINY, "optimizer.weight_decay=-1"]), r"optimizer.weight_decay must be >= 0"
    ),
    "poly without a limit": (
        _train([*TINY, "scheduler=poly", "trainer.max_steps=-1", "trainer.max_epochs=-1",
                "stages.fcn32s.max_steps=null"]),
        r"scheduler=poly decays the lr over the stage's length[\s\S]*trainer.max_steps",
    ),
    "cosine without a limit": (
        _train([*TINY, "scheduler=cosine", "trainer.max_steps=-1", "trainer.max_epochs=-1",
                "stages.fcn32s.max_steps=null"]),
        r"scheduler=cosine decays",
    ),
    "stages typo in the stage": (
        _train([*TINY, "++stages.fcn16.max_steps=3"]),
        r"stages.fcn16: no stage is called 'fcn16'",
    ),
    "stages typo in the setting": (
        _train([*TINY, "++stages.fcn16s.max_step=3"]),
        r"stages.fcn16s.max_step is not a Lightning Trainer argument",
    ),
    "unknown scheduler": (_train([*TINY, "scheduler.name=step"]), r"scheduler.name must be one of"),
    "loss reduction typo": (
        _train([*TINY, "loss.reduction=median"]), r"loss.reduction must be one of \('mean', 'sum'\)"
    ),
    "loss sampling zero": (
        _train([*TINY, "loss.sample_prob=0"]), r"loss.sample_prob must be in \(0, 1\]"
    ),
    "class weights of the wrong length": (
        _train([*TINY, "loss.class_weights=[1,2]"]),
        r"class_weights for head 'out' has 2 entries, the head has 5 classes",
    ),
    "pretrained file missing": (
        lambda t, r: ("train", [*TINY, f"arch.pretrained={t / 'vgg.pth'}"], t / "run"),
        r"pretrained weights file not found: .*vgg.pth",
    ),
    # --- checkpoints to start from
    "init_from missing": (
        lambda t, r: ("train", [*TINY, f"arch.init_from={t / 'x.ckpt'}"], t / "run"),
        r"arch.init_from: checkpoint not found: .*x.ckpt",
    ),
    "init_from empty": (
        lambda t, r: ("train", [*TINY, f"arch.init_from={_damaged_ckpt(t, r, 'empty')}"], t / "run"),
        r"arch.init_from: .*empty.ckpt is empty \(0 bytes\)",
    ),
    "init_from truncated": (
        lambda t, r: ("train", [*TINY, f"arch.init_from={_damaged_ckpt(t, r, 'half')}"], t / "run"),
        r"arch.init_from: .*half.ckpt .* is truncated",
    ),
    "init_from planted": (
        lambda t, r: ("train", [*TINY, "arch=fcn16s", f"arch.init_from={_planted(t, r)}"], t / "run"),
        r"holds objects other than tensors and plain values, which are not loaded \(weights_only",
    ),
    "init_streams without fusion": (
        lambda t, r: ("train", [*TINY, "staged=false", f"+arch.init_streams={{rgb: {_ckpt(t, r)}, hha: {_ckpt(t, r)}}}"], t / "run"),
        r"arch.init_streams needs a late-fusion model",
    ),
    # --- run folders
    "reused run folder": (
        lambda t, r: ("train", [*TINY, "arch=fcn32s"], _copy_run(t, r)),
        r"already holds a run[\s\S]*resume=true hydra.run.dir=[\s\S]*start a new run",
    ),
    "fdr into a finished run": (
        lambda t, r: ("train", [*TINY, "arch=fcn32s", "debug=fdr"], _copy_run(t, r)),
        r"already holds a run",
    ),
    "resume with nothing to resume": (
        lambda t, r: ("train", [*TINY, "resume=true"], t / "outputs" / "typo"),
        r"resume=true, but there is nothing to resume in .*typo",
    ),
    "resume with damaged metrics.json": (
        lambda t, r: _resume_from(t, r, lambda o: (o / "metrics.json").write_text('{"fcn32s": {')),
        r"metrics.json is damaged[\s\S]*Delete it and resume",
    ),
    "resume with damaged run.json": (
        lambda t, r: _resume_from(t, r, lambda o: (o / "run.json").write_text("{")),
        r"run.json is unreadable",
    ),
    "resume with an empty last.ckpt": (
        lambda t, r: _resume_from(t, r, lambda o: _truncate(o / "fcn32s/checkpoints/last.ckpt", empty=True)),
        r"resume=true: fcn32s: .*last.ckpt is empty \(0 bytes\)",
    ),
    "resume with a truncated best.ckpt": (
        lambda t, r: _resume_from(t, r, lambda o: _truncate(o / "fcn32s/checkpoints/best.ckpt")),
        r"resume=true: fcn32s: .*best.ckpt .* is truncated",
    ),
    "resume with a planted last.ckpt": (
        lambda t, r: _resume_from(t, r, _plant_last),
        r"last.ckpt holds objects other than tensors",
    ),
    "resume with another width": (
        lambda t, r: ("train", [*TINY, "arch=fcn32s", "resume=true", "arch.width=0.125"], _copy_run(t, r, _unfinish)),
        r"these differ:\s+arch.width: 0.0625 -> 0.125",
    ),
    # --- eval
    "eval ckpt missing": (
        lambda t, r: ("eval", [f"ckpt_path={t / 'nope.ckpt'}"], t / "run"),
        r"ckpt_path: checkpoint not found: .*nope.ckpt",
    ),
    "eval ckpt not ours": (
        lambda t, r: ("eval", [f"ckpt_path={_not_ours(t)}"], t / "run"),
        r"is not a checkpoint written by fcn-lightning",
    ),
    "eval ckpt empty": (
        lambda t, r: ("eval", [f"ckpt_path={_damaged_ckpt(t, r, 'empty')}"], t / "run"),
        r"empty.ckpt is empty \(0 bytes\)",
    ),
    "eval ckpt truncated": (
        lambda t, r: ("eval", [f"ckpt_path={_damaged_ckpt(t, r, 'half')}"], t / "run"),
        r"half.ckpt .* is truncated",
    ),
    "eval ckpt planted": (
        lambda t, r: ("eval", [f"ckpt_path={_planted(t, r)}"], t / "run"),
        r"planted.ckpt holds objects other than tensors",
    ),
    "eval output is a file": (
        lambda t, r: ("eval", [f"ckpt_path={_ckpt(t, r)}", f"output={_existing(t)}"], t / "run"),
        r"output=.*eval.json is a file",
    ),
    "eval into another evaluation's folder": (
        lambda t, r: ("eval", [f"ckpt_path={_ckpt(t, r)}", f"output={_existing(t).parent}"], t / "run"),
        r"eval.json holds another evaluation",
    ),
    "eval with other classes": (
        lambda t, r: ("eval", [f"ckpt_path={_ckpt(t, r)}", "data=nyud", f"data.root={_nyud(t)}"], t / "run"),
        r"predicts \{'out': 5\} classes but .* has \{'out': 40\}",
    ),
    # --- predict
    "predict input missing": (
        lambda t, r: ("predict", [f"ckpt_path={_ckpt(t, r)}", f"input={t / 'photos'}", f"output={t}"], t / "run"),
        r"input not found: .*photos",
    ),
    "predict into the input folder": (
        lambda t, r: ("predict", [f"ckpt_path={_ckpt(t, r)}", f"input={_photos(t)}", f"output={t / 'photos'}"], t / "run"),
        r"output .*photos is the input folder",
    ),
    "predict ckpt truncated": (
        lambda t, r: ("predict", [f"ckpt_path={_damaged_ckpt(t, r, 'half')}", f"input={_photos(t)}", f"output={t / 'out'}"], t / "run"),
        r"half.ckpt .* is truncated",
    ),
}  # fmt: skip


def _existing(t: Path) -> Path:
    path = t / "eval.json"
    path.write_text('{"earlier": "results"}\n')
    return path


def _not_ours(t: Path) -> Path:
    path = t / "other.ckpt"
    torch.save({"weights": torch.zeros(1)}, path)
    return path


def _nyud(t: Path) -> Path:
    from helpers.datasets import write_nyud

    return write_nyud(t / "nyud", {"train": ["1"], "val": ["2"], "test": ["3"]})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_table_has_forty_rows():
    assert len(BAD) >= 40


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_table(tmp_path, finished_run, case):
    make, message = BAD[case]
    entry, overrides, out = make(tmp_path, finished_run)
    cfg = cfg_of({"train": "config", "eval": "eval", "predict": "predict"}[entry], overrides, out)
    fn = {"train": train, "eval": evaluate, "predict": predict}[entry]
    before, shared = _files(tmp_path), _files(finished_run)
    with pytest.raises(Exception, match=message):
        fn(cfg)
    after = _files(tmp_path)
    changed = [p for p, data in before.items() if after.get(p) != data]
    for record in [p for p in changed if p.endswith("run.json")]:  # a resume that failed ...
        earlier, now = json.loads(before[record]), json.loads(after[record])
        history = earlier.pop("history", [])
        assert now["history"] == [*history, earlier] and now["status"] == "failed"  # adds to it
        changed.remove(record)
    assert not changed, f"{case}: changed or removed {changed}"
    assert _files(finished_run) == shared
    assert not (tmp_path / "CODE_RAN").exists()  # no checkpoint ran code
    if entry == "train":  # failed before any training
        assert not [p for p in out.glob("fcn*/checkpoints/*.ckpt") if str(p) not in before]


# --------------------------------------------------------------------------- as commands
# Each row: a command as a user types it (a process of its own), its exit status, the one line
# it prints, and no file present before changed. Cases that need a file system to run out of
# inodes, blocks or quota are monkeypatched in tests/test_prepare.py, in the same form.
WRAPPED = """import os, runpy, signal, sys
{patch}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
PREPARE = "import runpy, sys\nsys.argv[0] = 'prepare'\nrunpy.run_module('fcn_lightning.prepare', run_name='__main__')\n"
TORCHVISION_FCN = PREPARE.replace("'prepare'", "'import'").replace(
    ".prepare'", ".app.torchvision_fcn'"
)
CTRL_C_AFTER_ONE_BATCH = """from fcn_lightning.app.predict import PredictionFiles
write = PredictionFiles.write_on_batch_end
def pressed(self, *args):
    write(self, *args)
    os.kill(os.getpid(), signal.SIGINT)
PredictionFiles.write_on_batch_end = pressed"""
EDITED_AFTER_THE_CHECK = """import numpy as np
from PIL import Image
from fcn_lightning.app import common, train
check = common.label_report
def then_edited(dm, *args, **kwargs):
    report = check(dm, *args, **kwargs)
    label = Image.open(os.environ["EDIT"]); bad = np.array(label); bad[2, 3] = 40
    Image.fromarray(bad).save(os.environ["EDIT"])  # 'L': a grey label
    return report
common.label_report = train.label_report = then_edited"""


DISK_FULL_WHILE_WRITING = """import errno
from fcn_lightning.app import export
write = export.write_atomically
def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
export.write_atomically = full"""
TINY_LOGITS_FLIPPED = """from fcn_lightning.app import export
run = export.ExportedRunner.__call__
def flipped(self, x):  # off by far less than 1e-4, yet every label differs at this scale
    return {h: y.flip(1) for h, y in run(self, x).items()}
export.ExportedRunner.__call__ = flipped"""


def _tiny_logits_ckpt(t: Path) -> Path:
    from fcn_lightning.module import FCNModule

    module = FCNModule({"arch": "fcn32s", "width": 1 / 16, "dropout": 0.0, "geometry": "same"})
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "score" in name:
                p.normal_(0, 1e-7)  # logits of about 1e-7, as an NYUD net's can be
    torch.save(
        {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
        t / "tiny.ckpt",
    )
    return t / "tiny.ckpt"


def _script(t: Path, name: str, text: str) -> Path:
    (t / "scripts").mkdir(exist_ok=True)
    (t / "scripts" / name).write_text(text)
    return t / "scripts" / name


def _wrapped(t: Path, patch: str, script: str) -> list:
    return [_script(t, "wrapped.py", WRAPPED.format(patch=patch)), ROOT / script]


def _text(t: Path) -> Path:
    (t / "notes.pth").write_text("hello world, not weights\n" * 50)
    return t / "notes.pth"


def _weights(t: Path, key: str) -> Path:
    """A small state dict of the wrong net: one ``key`` (a VGG16's ``features.0.weight``, ...)."""
    torch.save({key: torch.zeros(2, 3, 3, 3)}, t / "weights.pth")
    return t / "weights.pth"


def _a_file(t: Path) -> Path:
    (t / "notes.txt").write_text("mine")
    return t / "notes.txt"


def _backslash_tar(t: Path) -> Path:
    import io
    import tarfile

    with tarfile.open(t / "w.tar", "w") as tar:
        info = tarfile.TarInfo("VOCdevkit\\VOC2011\\ImageSets\\Segmentation\\train.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"a\n"))
    return t / "w.tar"


def _sibling_and_cousin(t: Path) -> Path:
    for run in ("outputs/day/10-00-00", "outputs/day/sweep/0_optimizer.lr=0.1"):
        (t / run).mkdir(parents=True)
        (t / run / "run.json").write_text('{"status": "finished"}')
    return t / "outputs/day/10-00-0"  # a typo


def _photos3(t: Path) -> Path:
    (t / "photos").mkdir()
    for i in range(3):
        Image.fromarray(np.full((20 + i, 24, 3), 60 * i, np.uint8)).save(t / "photos" / f"{i}.png")
    return t / "photos"


def _label_folder(t: Path) -> Path:
    from helpers.datasets import write_folder

    return write_folder(t / "mine", ["a", "b"], ["bg", "x", "y"], {"train": ["a", "b"]})


ONE_STEP = [*TINY, "arch=fcn32s"]
COMMANDS = {
    # --- run folders (hydra.run.dir is checked before Hydra makes it)
    "run dir is a file": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, f"hydra.run.dir={_a_file(t)}"]),
        1, r"^Error: hydra.run.dir=.*notes.txt is a file, not a folder",
    ),
    "run dir under a file": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, f"hydra.run.dir={_a_file(t)}/run"]),
        1, r"^Error: hydra.run.dir=.*notes.txt/run lies under .*notes.txt, which is a file",
    ),
    "run dir read-only": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, "hydra.run.dir=/sys/fcn_run"]),
        1, r"^Error: hydra.run.dir=/sys/fcn_run: cannot write in /sys \(Permission denied\)",
    ),
    "run dir empty": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, "hydra.run.dir=''"]),
        1, r"^Error: hydra.run.dir is empty \(an unset variable\?\): name the folder",
    ),
    "run dir inside another run": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, f"hydra.run.dir={r}/fcn32s"]),
        1, r"^Error: hydra.run.dir=.*/fcn32s lies in the run folder .* \(it holds run.json\)",
    ),
    "sweep dir is a run": (
        lambda t, r: ([ROOT / "train.py", "-m", *ONE_STEP, f"hydra.sweep.dir={r}"]),
        1, r"^Error: hydra.sweep.dir=.* lies in the run folder",
    ),
    "sweep dir is a file": (
        lambda t, r: ([ROOT / "train.py", "-m", *ONE_STEP, f"hydra.sweep.dir={_a_file(t)}"]),
        1, r"^Error: hydra.sweep.dir=.*notes.txt is a file, not a folder",
    ),
    "resume names siblings, not cousins": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, "resume=true", f"hydra.run.dir={_sibling_and_cousin(t)}"]),
        1, r"nothing to resume in .*10-00-0 [\s\S]*\n  a run nearby: .*day/10-00-00\n?$",
    ),
    # --- sweeps
    "sweep jobs sharing a folder": (
        lambda t, r: ([ROOT / "train.py", "-m", *ONE_STEP, "optimizer.lr=0.001,0.002", f"hydra.sweep.dir={t / 'sweep'}",
                       "hydra.sweep.subdir=same"]),
        1, r"sweep: 1 of 2 jobs failed \(job 1\)",
    ),
    "sweep job refused by a class": (
        lambda t, r: ([ROOT / "train.py", "-m", *NO_DATA, "arch=fcn32s", "data.image_size=4,32", f"hydra.sweep.dir={t / 'sweep'}",
                       "hydra.sweep.subdir=job_${hydra.job.num}"]),
        1, r"0 +FAILED .*\(ValueError: data.image_size must be >= 8, got 4\)[\s\S]*1 of 2 jobs failed",
    ),
    "a class refuses a value": (
        lambda t, r: ([ROOT / "train.py", *NO_DATA, "arch=fcn32s", "data.image_size=4", f"hydra.run.dir={t / 'run'}"]),
        1, r"^Error: data.image_size must be >= 8, got 4\n$",
    ),
    # --- trunks
    "a skip the output stride does not have": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, "arch=fcn16s", "arch.backbone=resnet50", "arch.output_stride=16",
                       f"hydra.run.dir={t / 'run'}"]),
        1, r"^Error: fcn16s on arch.backbone=resnet50, arch.output_stride=16, arch.geometry=same: fcn16s fuses the "
           r"pool4 tap \(stride 16\) into a coarser map",
    ),
    "a ResNet given VGG16 weights": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, "arch.backbone=resnet50",
                       f"arch.pretrained={_weights(t, 'features.0.weight')}", f"hydra.run.dir={t / 'run'}"]),
        1, r"^Error: .*weights.pth does not hold a torchvision-layout ResNet-50 state dict \(keys starting 'layer1.'",
    ),
    "torchvision FCN import of a classifier": (
        lambda t, r: ([_script(t, "import.py", TORCHVISION_FCN), _weights(t, "layer1.0.conv1.weight"), t / "tv.ckpt"]),
        1, r"^Error: not a torchvision fcn_resnet50 / fcn_resnet101 state dict",
    ),
    # --- interruptions
    "SIGTERM while training": (
        lambda t, r: ([ROOT / "train.py", *ONE_STEP, "trainer.max_steps=3", f"hydra.run.dir={t / 'run'}",
                       "+callbacks.kill._target_=interrupts.SigtermAtStep", "+callbacks.kill.step=1"]),
        143, r"stopped by SIGTERM at epoch \d+, step 1;[\s\S]*Continue with: python \S*train.py .*arch.width=0.0625 .*"
             r"\+callbacks.kill.step=1 resume=true hydra.run.dir=",
    ),
    "Ctrl+C in predict": (
        lambda t, r: ([*_wrapped(t, CTRL_C_AFTER_ONE_BATCH, "predict.py"), f"ckpt_path={_ckpt(t, r)}",
                       f"input={_photos3(t)}", f"output={t / 'labels'}", "batch_size=1"]),
        130, r"^predict.py was interrupted \(Ctrl\+C\): 1 of 3 images written \(label map and overlay each\) to "
             r".*labels; run the same command again",
    ),
    "SIGTERM in predict": (
        lambda t, r: ([*_wrapped(t, CTRL_C_AFTER_ONE_BATCH.replace("SIGINT", "SIGTERM"), "predict.py"),
                       f"ckpt_path={_ckpt(t, r)}", f"input={_photos3(t)}", f"output={t / 'labels'}", "batch_size=1"]),
        143, r"^predict.py was stopped by SIGTERM: 1 of 3 images written",
    ),
    # --- labels
    "label edited after the check, met by a loader worker": (
        lambda t, r: ([*_wrapped(t, EDITED_AFTER_THE_CHECK, "train.py"), *NO_DATA, "arch=fcn32s", "data=folder",
                       f"data.root={_label_folder(t)}", "data.num_workers=1", "data.batch_size=1", "data.batching=pad",
                       "data.val_split=train", "arch.pretrained=null", "arch.backbone=vgg16_bn", f"hydra.run.dir={t / 'run'}"]),
        1, r"^Error: label .*SegmentationClass/a.png has values \[40\] outside 0..2 and 255",
    ),
    # --- export
    "export into a read-only place": (
        lambda t, r: ([ROOT / "export.py", f"ckpt_path={_ckpt(t, r)}", "format=exported_program",
                       "output=/sys/fcn_export/net.pt2"]),
        1, r"^Error: output folder /sys/fcn_export cannot be created: /sys is read-only \(",
    ),
    "export onto a full disk": (
        lambda t, r: ([*_wrapped(t, DISK_FULL_WHILE_WRITING, "export.py"), f"ckpt_path={_ckpt(t, r)}",
                       "format=exported_program", f"output={t / 'deploy/net.pt2'}"]),
        1, r"^Error: could not write .*deploy/net.pt2: disk full \(No space left on device\); nothing was written",
    ),
    "export check on tiny logits": (
        lambda t, r: ([*_wrapped(t, TINY_LOGITS_FLIPPED, "export.py"), f"ckpt_path={_tiny_logits_ckpt(t)}",
                       "format=exported_program", f"output={t / 'deploy/net.pt2'}"]),
        1, r"^Error: .*differs from the checkpoint[\s\S]*labels differ at \d+ pixel",
    ),
    # --- prepare
    "prepare root empty": (
        lambda t, r: ([_script(t, "prepare.py", PREPARE), "voc", "--root", ""]),
        1, r"^Error: --root is empty \(an unset variable\?\)",
    ),
    "prepare archive not a file": (
        lambda t, r: ([_script(t, "prepare.py", PREPARE), "voc", "--root", t / "voc", "--archive", "/dev/null"]),
        1, r"^Error: --archive /dev/null is not a regular file",
    ),
    "prepare tar with Windows separators": (
        lambda t, r: ([_script(t, "prepare.py", PREPARE), "voc", "--root", t / "voc", "--archive", _backslash_tar(t),
                       "--md5", hashlib.md5((t / "w.tar").read_bytes()).hexdigest()]),
        1, r"^Error: .*w.tar uses Windows '\\' separators in its member names \(e.g. 'VOCdevkit\\VOC2011",
    ),
}  # fmt: skip


def _refuses_writes(folder: str) -> bool:
    import tempfile

    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("case", list(COMMANDS))
def test_bad_input_table_of_commands(tmp_path, finished_run, case):
    make, status, message = COMMANDS[case]
    if "read-only" in case and not _refuses_writes("/sys"):
        pytest.skip("/sys takes files on this machine")
    (tmp_path / "cwd").mkdir()
    env = {"EDIT": str(tmp_path / "mine/SegmentationClass/a.png")}
    argv = make(tmp_path, finished_run)
    before, shared = _files(tmp_path), _files(finished_run)
    os.environ.update(env)  # the commands' environment is this process's
    try:
        (result,) = commands(argv, cwd=tmp_path / "cwd")
    finally:
        for key in env:
            os.environ.pop(key)
    err = result.stderr
    assert result.returncode == status, err[-3000:]
    assert re.search(message, err, re.M) or re.search(message, result.stdout, re.M), err[-3000:]
    assert "Traceback" not in err and "Original Traceback" not in err, err[-3000:]
    after = _files(tmp_path)
    assert not [p for p, data in before.items() if after.get(p) != data and "/mine/" not in p]
    assert _files(finished_run) == shared


def test_local_submitit_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = cli("-m", "hydra/launcher=local", "hydra.launcher.cpus_per_task=1", "arch=fcn32s",
                 "optimizer.lr=1e-3,1e-4", *TINY, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0_optimizer.lr=0.001", "1_optimizer.lr=0.0001"):  # named by what varies
        assert (tmp_path / job / "metrics.json").is_file()
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
    assert list(sampler) == full[4:]
    assert len(sampler) == 10  # an epoch's length stays whole: Lightning counts it once
    assert list(sampler) == full  # only once
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_datamodule_ignores_resume_state_outside_fit():
    from fcn_lightning.data import SyntheticDataModule

    dm = SyntheticDataModule(train_size=8, image_size=16, batch_size=2)
    dm.load_state_dict({"epoch": 0, "samples_done": 4})  # e.g. restored by validate(ckpt_path=...)
    assert len(dm.train_dataloader().sampler) == 8
