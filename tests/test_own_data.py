"""A first run on one's own data (data=folder): a recipe made for ImageNet weights is refused on
random weights, naming the from-scratch recipe; the folder recipe trains on random crops for a
budget of steps and validates every N steps, also when a few images make one-step epochs."""

from __future__ import annotations

import re

import pytest
from helpers import cfg_of
from helpers.datasets import write_folder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn_lightning.app.checks import check_settings
from fcn_lightning.app.common import make_datamodule
from fcn_lightning.app.stages import trainer_settings
from fcn_lightning.app.train import train
from fcn_lightning.errors import ConfigError

FROM_SCRATCH = ["arch.pretrained=null"]
OPT_OUT = "++force_from_scratch=true"


@pytest.mark.parametrize("data", ["folder", "voc"])
def test_imagenet_recipe_on_random_weights_is_refused_naming_the_scratch_recipe(data, tmp_path):
    args = [f"data={data}", "data.root=/d", *FROM_SCRATCH]
    with pytest.raises(ConfigError, match=re.escape(OPT_OUT)) as refused:
        check_settings(cfg_of("config", args))
    said = str(refused.value)
    assert "arch.pretrained=null" in said and "SGD at lr 0.0001" in said
    # the overrides it names, as the quickstart uses them, make a run that passes
    named = re.search(r"as the quickstart does: (\S+) ", said).group(1)
    assert named == "recipe=scratch"
    # the recipe it names makes a run that passes, training as the quickstart does: a batch-norm
    # trunk from random weights, AdamW, the lr halved into each later stage
    scratch = cfg_of("config", [*args, named])
    check_settings(scratch)
    assert (scratch.arch.backbone, scratch.arch.pretrained, scratch.optimizer.name) == (
        "vgg16_bn",
        None,
        "adamw",
    )
    assert scratch.stages.fcn16s.lr_factor == scratch.stages.fcn8s.lr_factor == 0.5
    check_settings(cfg_of("config", [*args, OPT_OUT]))  # those who mean it
    check_settings(cfg_of("config", [f"data={data}", "data.root=/d"]))  # ImageNet weights
    with pytest.raises(ConfigError, match="learns next to nothing"):  # as train.py runs it
        train(cfg_of("config", args, tmp_path))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_refusal_leaves_other_starts_and_solvers_alone():
    base = ["data=folder", "data.root=/d", *FROM_SCRATCH]
    for other in (["arch.backbone=vgg16_bn"], ["optimizer=adamw"], ["optimizer.lr=1e-2"],
                  ["arch=fcn16s", "arch.init_from=/x.ckpt"]):  # fmt: skip
        check_settings(cfg_of("config", [*base, *other]))
    with pytest.raises(ConfigError, match="arch.backbone=alexnet"):
        check_settings(cfg_of("config", [*base, "arch.backbone=alexnet"]))


@pytest.mark.parametrize(("accelerator", "batch", "crop", "every"), [("gpu", 8, 320, 100),
                                                                     ("cpu", 2, 224, 20)])  # fmt: skip
def test_folder_recipe_trains_on_crops_for_steps(accelerator, batch, crop, every):
    cfg = cfg_of("config", ["data=folder", "data.root=/d", f"trainer.accelerator={accelerator}"])
    check_settings(cfg)
    assert cfg.arch.pretrained == "imagenet" and cfg.optimizer.name == "sgd"
    dm = make_datamodule(cfg.data, num_classes=3)
    assert (dm.batching, dm.batch_size, dm.crop_size) == ("crop", batch, crop)
    assert (dm.scale_range, dm.hflip, dm.val_batch_size) == ([0.5, 2.0], True, 1)
    budgets = {s: trainer_settings(cfg, s).max_steps for s in ("fcn32s", "fcn16s", "fcn8s")}
    assert budgets == {"fcn32s": 3000, "fcn16s": 1000, "fcn8s": 1000}
    t = trainer_settings(cfg, "fcn32s")
    assert (t.max_epochs, t.val_check_interval, t.check_val_every_n_epoch) == (-1, every, None)
    assert t.num_sanity_val_steps == 0


def test_a_few_images_get_a_val_curve_in_steps_not_per_epoch(tmp_path):
    ids = [f"p{i}" for i in range(8)]  # 8 photos: at batch 8, every epoch is one step
    root = write_folder(tmp_path / "mine", ids, ["background", "thing", "other"],
                        {"train": ids, "val": ids[:2]}, size=(40, 48))  # fmt: skip
    args = ["data=folder", f"data.root={root}", "data.batch_size=8", "data.crop_size=32",
            "data.num_workers=0", "arch=fcn32s", "arch.width=0.0625", "recipe=scratch",
            "trainer.accelerator=cpu", "trainer.max_steps=6", "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1", "callbacks=none", "images.panel_size=1"]  # fmt: skip
    train(cfg_of("config", args, tmp_path / "run"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "fcn32s"))
    events.Reload()
    val = [e.step for e in events.Scalars("val/mIoU")]
    trained = [e.step for e in events.Scalars("train/loss")]
    assert len(trained) == 6 and len(val) == 3  # every 2 steps, not after each of 6 epochs
    assert val[0] < trained[-1] and val == sorted(val)
