"""What a run tells its user as it goes: curves of short runs, the stage's last validation as a
point of its curves, a model that predicts one class named as such, debug=overfit validating on
what it trains on, and resume=true with a larger budget on a finished run."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import TINY, cfg_of
from pytorch_lightning.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn_lightning.app.train import one_class, train
from fcn_lightning.contract import DataContract
from fcn_lightning.module import FCNModule

ONE_STAGE = [*TINY, "arch=fcn32s", "staged=false"]
SEEN: dict[str, list[torch.Tensor]] = {"train": [], "val": []}


class BatchSpy(Callback):
    """Keeps the images of every training and validation batch (in SEEN)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        SEEN["train"].append(batch[0].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *_) -> None:
        if not trainer.sanity_checking:
            SEEN["val"].append(batch[0].clone())


def scalars(out, stage: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "tensorboard" / stage), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def test_a_short_run_has_every_step_and_its_last_validation_on_the_curves(tmp_path):
    # 3 steps, no validation during the fit (every 100 epochs): Lightning alone would log no
    # val/* scalar and train/loss every log_every_n_steps (10 by default)
    over = ["trainer.max_steps=3", "trainer.check_val_every_n_epoch=100"]
    cfg = cfg_of("config", [*ONE_STAGE, *over, "trainer.log_every_n_steps=10"], tmp_path)
    train(cfg)
    curves = scalars(tmp_path, "fcn32s")
    assert [s for s, _ in curves["train/loss"]] == [0, 1, 2]
    metrics = json.loads((tmp_path / "metrics.json").read_text())["fcn32s"]
    ((step, value),) = curves["val/mIoU"]
    assert step == 3 and value == pytest.approx(metrics["mIoU"], abs=1e-6)
    assert any(t.startswith("val/IoU/") for t in curves)


def test_a_model_that_predicts_one_class_is_named_in_the_stage_line(tmp_path, caplog):
    # the score layer starts at zero (the paper's init): without learning, every logit is equal
    # and every pixel gets class 0
    over = ["optimizer.lr=1e-12", "trainer.max_steps=1"]
    with caplog.at_level(logging.INFO, logger="fcn_lightning"):
        train(cfg_of("config", [*ONE_STAGE, *over], tmp_path))
    done = [r for r in caplog.records if " done: val mIoU" in r.getMessage()]
    assert len(done) == 1 and done[0].levelno == logging.WARNING
    assert "predicts 'background' for every pixel" in done[0].getMessage()
    assert "nothing learned yet" in done[0].getMessage()


def test_one_class_is_found_only_where_a_single_class_is_predicted():
    module = FCNModule(
        {"arch": "fcn32s", "width": 0.0625}, contract=DataContract.for_classes({"out": 3})
    )
    module.confmats = {"val": {"out": torch.tensor([[5, 0, 0], [2, 0, 0], [0, 0, 0]])}}
    assert one_class(module) == {"out": module.contract.class_names("out")[0]}
    module.confmats["val"]["out"][1, 1] = 1  # a second class predicted somewhere
    assert one_class(module) == {}


def test_debug_overfit_validates_on_the_batches_it_trains_on(tmp_path):
    SEEN["train"].clear(), SEEN["val"].clear()
    over = [
        "debug=overfit", "trainer.overfit_batches=1", "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1", "+callbacks.spy._target_=test_run_feedback.BatchSpy",
    ]  # fmt: skip
    mine = [o for o in ONE_STAGE if not o.startswith("data.val_batch_size")]  # debug's, not TINY's
    cfg = cfg_of("config", [*mine, "trainer.max_steps=-1", *over], tmp_path)
    assert cfg.data.val_split == cfg.data.train_split and not cfg.data.hflip
    assert cfg.data.scale_range is None and cfg.data.val_batch_size == cfg.data.batch_size
    train(cfg)
    assert len(SEEN["train"]) == 2 and len(SEEN["val"]) >= 2
    for images in (*SEEN["train"], *SEEN["val"]):  # the same batch every time, to the bit
        assert torch.equal(images, SEEN["train"][0])


def test_resume_with_a_larger_budget_trains_the_last_stage_on(tmp_path):
    train(cfg_of("config", ONE_STAGE, tmp_path))  # 1 step, finished
    last = tmp_path / "fcn32s" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 1
    train(cfg_of("config", [*ONE_STAGE, "resume=true", "trainer.max_steps=3"], tmp_path))
    assert torch.load(last, weights_only=True)["global_step"] == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())["fcn32s"]
    assert metrics["checkpoint"]["step"] == 3
    # the same budget again: nothing to train on, the stage is skipped
    train(cfg_of("config", [*ONE_STAGE, "resume=true", "trainer.max_steps=3"], tmp_path))
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_resume_with_a_larger_budget_on_a_staged_run_keeps_the_first_stage_and_says_so(
    tmp_path, caplog
):
    staged = [*TINY, "arch=fcn16s"]
    train(cfg_of("config", staged, tmp_path))
    first = (tmp_path / "fcn32s" / "checkpoints" / "last.ckpt").read_bytes()
    with caplog.at_level(logging.INFO, logger="fcn_lightning"):
        train(cfg_of("config", [*staged, "resume=true", "trainer.max_steps=2"], tmp_path))
    assert (tmp_path / "fcn32s" / "checkpoints" / "last.ckpt").read_bytes() == first
    kept = [r.getMessage() for r in caplog.records if "is kept" in r.getMessage()]
    assert len(kept) == 1 and kept[0].startswith("fcn32s finished at step 1 before")
    last16 = tmp_path / "fcn16s" / "checkpoints" / "last.ckpt"
    assert torch.load(last16, weights_only=True)["global_step"] == 2
