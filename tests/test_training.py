"""The LightningModule: metrics against score.py, TensorBoard output, resuming, learning."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassJaccardIndex

from fcn_lightning.app.board import HParamsTab, ValidationImages
from fcn_lightning.app.callbacks import best_checkpoint, last_checkpoint
from fcn_lightning.contract import DataContract
from fcn_lightning.data import SyntheticDataModule
from fcn_lightning.metrics import ConfusionJaccardIndex, HeadMetrics, PixelAccuracy
from fcn_lightning.module import FCNModule, load_checkpoint


# --------------------------------------------------------------------------- metrics vs score.py
def score_py(gt: np.ndarray, pred: np.ndarray, n: int) -> dict[str, object]:
    """The reference score.py, in numpy."""
    k = (gt >= 0) & (gt < n)
    hist = np.bincount(n * gt[k].astype(int) + pred[k], minlength=n**2).reshape(n, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        mean_acc = np.nanmean(np.diag(hist) / hist.sum(1))
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        freq = hist.sum(1) / hist.sum()
    return {
        "pixel_acc": acc,
        "mean_acc": mean_acc,
        "mIoU": np.nanmean(iu),
        "fwIoU": (freq[freq > 0] * iu[freq > 0]).sum(),
        "iu": iu,
    }


@pytest.mark.parametrize("seed", range(4))
def test_four_metrics_equal_score_py(seed):
    rng = np.random.default_rng(seed)
    n = 7
    metric = HeadMetrics(n)
    reference = MulticlassJaccardIndex(n, ignore_index=255, average="macro")
    gts, preds = [], []
    for _ in range(3):  # several batches accumulate
        gt = rng.integers(0, n, (2, 17, 23))
        gt[gt == 3] = 1  # class 3 never in ground truth ...
        gt[rng.random(gt.shape) < 0.2] = 255  # ... ignored pixels ...
        pred = rng.integers(0, n, (2, 17, 23))
        pred[pred == 5] = 0  # ... class 5 never predicted
        if seed % 2:
            pred[pred == 6] = 0
            gt[gt == 6] = 0  # class 6 absent from both: NaN, left out of the means
        gts.append(gt)
        preds.append(pred)
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
        reference.update(torch.from_numpy(pred), torch.from_numpy(gt))
    expected = score_py(
        np.concatenate([g.ravel() for g in gts]), np.concatenate([p.ravel() for p in preds]), n
    )
    got = metric.compute()
    for key in ("pixel_acc", "mean_acc", "mIoU", "fwIoU"):
        assert float(got[key]) == pytest.approx(expected[key], rel=1e-6), key
    np.testing.assert_allclose(got["per_class_IoU"].numpy(), expected["iu"], rtol=1e-6)
    assert float(reference.compute()) == pytest.approx(
        float(got["mIoU"]), rel=1e-6
    )  # the sync-free update


def test_pixel_accuracy_counts_only_labelled_pixels():
    m = PixelAccuracy()
    target = torch.tensor([[0, 1, 255, 255]])
    m.update(torch.tensor([[0, 0, 1, 1]]), target)
    assert float(m.compute()) == 0.5
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = 1.0  # predicts class 1 everywhere
    m.reset()
    m.update(logits, target)
    assert float(m.compute()) == 0.5


def test_confusion_matrix_rows_are_ground_truth():
    m = ConfusionJaccardIndex(3)
    m.update(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 0, 255]))
    assert m.confmat.tolist() == [[1, 0, 2], [0, 0, 0], [0, 0, 0]]


# --------------------------------------------------------------------------- module helpers
def tiny_module(**kw) -> FCNModule:
    model = {
        "arch": "fcn8s",
        "num_classes": 5,
        "backbone": "vgg16_bn",
        "geometry": "same",
        "width": 0.125,
        "dropout": 0.0,
    }
    model |= kw.pop("model", {})
    kw.setdefault("optimizer", {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0})
    names = ["background", "blob", "bar", "dot", "ring"][: model.pop("num_classes")]
    return FCNModule(model, contract=DataContract.for_classes({"out": names}), **kw)


def tiny_data(**kw) -> SyntheticDataModule:
    kw = {
        "image_size": 48,
        "train_size": 8,
        "val_size": 4,
        "batch_size": 4,
        "val_batch_size": 2,
    } | kw
    return SyntheticDataModule(**kw)


def trainer(tmp_path, panels: ValidationImages | None = None, **kw) -> pl.Trainer:
    kw = {
        "max_epochs": 2,
        "logger": TensorBoardLogger(tmp_path / "tb", name="", default_hp_metric=False),
        "callbacks": [
            LearningRateMonitor(),
            panels or ValidationImages(),
            HParamsTab(),
            best_checkpoint(tmp_path / "ckpt"),
            last_checkpoint(tmp_path / "ckpt"),
        ],
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "deterministic": True,
        "default_root_dir": tmp_path,  # the figures' PNGs go to <it>/figures
    } | kw
    return pl.Trainer(**kw)


def test_tiny_fit_writes_every_tensorboard_tag(tmp_path):
    pl.seed_everything(0)
    module, data = tiny_module(), tiny_data()
    t = trainer(tmp_path)
    t.fit(module, data)
    t.test(module, data, verbose=False)
    events = EventAccumulator(
        str(t.logger.log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    )
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for split in ("val", "test"):
        for name in ("loss", "mIoU", "pixel_acc", "mean_acc", "fwIoU"):
            assert f"{split}/{name}" in scalars, (split, name, sorted(scalars))
    assert {"train/loss", "val/IoU/background", "hp/mIoU"} <= scalars
    assert len(events.Scalars("train/loss")) == 4  # every step
    assert any(tag.startswith("lr-AdamW") for tag in scalars)
    assert {"lr-AdamW/weights", "lr-AdamW/biases"} <= scalars  # the groups say what they are
    assert len(events.Scalars("val/mIoU")) == 2  # one per epoch
    images = set(events.Tags()["images"])
    assert {"val/predictions", "val/confusion_matrix", "val/per_class_IoU"} <= images
    panel = events.Images("val/predictions")[-1]  # a labelled figure (tests/test_board.py)
    assert panel.width >= 400 and panel.height >= 200
    assert (tmp_path / "figures" / "predictions.png").is_file()
    hparams = [
        p for p in events.summary_metadata.values() if p.plugin_data.plugin_name == "hparams"
    ]
    assert hparams or "_hparams_/session_start_info" in events.Tags()["tensors"]
    assert set(module.results["val"]["out"]) >= {
        "mIoU",
        "pixel_acc",
        "mean_acc",
        "fwIoU",
        "per_class_IoU",
    }


def test_resume_from_last_checkpoint_restores_epoch_step_and_optimizer(tmp_path):
    pl.seed_everything(0)
    t = trainer(tmp_path)
    t.fit(tiny_module(), tiny_data())
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # no pickled objects inside
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    assert (tmp_path / "ckpt" / "best.ckpt").is_file()

    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, module):
            seen["epoch"], seen["step"] = trainer.current_epoch, trainer.global_step
            state = trainer.optimizers[0].state_dict()["state"]
            seen["exp_avg"] = state[0]["exp_avg"].clone()

    t2 = trainer(
        tmp_path, max_epochs=3, callbacks=[Probe()], logger=False, enable_checkpointing=False
    )
    t2.fit(tiny_module(), tiny_data(), ckpt_path=last)
    assert seen["epoch"] == 2 and seen["step"] == 4
    torch.testing.assert_close(seen["exp_avg"], ckpt["optimizer_states"][0]["state"][0]["exp_avg"])
    assert t2.global_step == 6

    again = load_checkpoint(last)  # the model alone, rebuilt from the checkpoint
    assert again.model.spec.arch == "fcn8s" and again.hparams.optimizer["name"] == "adamw"


def test_overfit_handful_of_synthetic_images():
    # 4 images with coarse structures (thickness 6): the fixed stride-8 bilinear output of FCN-8s
    # cannot draw 2-4 px bars, so the default scenes cap a perfect fit well below 0.9.
    pl.seed_everything(0)
    data = tiny_data(
        image_size=64,
        train_size=4,
        val_split="train",
        batch_size=4,
        val_batch_size=4,
        thickness=6.0,
    )
    # AdamW at 1e-2 (not tiny_module's 3e-3): the fit in 200 steps, not 350 (mIoU 0.92 either way)
    module = tiny_module(
        scheduler={"name": "poly"}, optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}
    )
    t = pl.Trainer(
        max_steps=200,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=1000,
        num_sanity_val_steps=0,
    )
    t.fit(module, data)
    t.validate(module, data, verbose=False)
    assert module.results["val"]["out"]["mIoU"] > 0.9, module.results["val"]


# --------------------------------------------------------------------------- loss and solver
def _grads(module, images, target):
    module.zero_grad()
    module.loss(module(images), {"out": target}).backward()
    return torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])


def test_sum_and_mean_loss_give_the_same_gradient_direction():
    torch.manual_seed(0)
    mean = tiny_module(loss_reduction="mean")
    total = tiny_module(loss_reduction="sum")
    with torch.no_grad():
        mean.model.heads["out"].score_fr.weight.normal_(std=0.1)
    total.load_state_dict(mean.state_dict())
    images = torch.randn(2, 3, 40, 40)
    target = torch.randint(0, 5, (2, 40, 40))
    target[:, :5] = 255
    g_mean, g_sum = _grads(mean, images, target), _grads(total, images, target)
    labelled = int((target != 255).sum())
    assert torch.nn.functional.cosine_similarity(g_mean, g_sum, dim=0) > 0.9999
    torch.testing.assert_close(
        g_sum, g_mean * labelled, rtol=1e-3, atol=1e-5 * float(g_sum.abs().max())
    )


def test_mean_loss_matches_cross_entropy_with_class_weights():
    module = tiny_module(class_weights=[1.0, 2.0, 0.5, 1.0, 3.0])
    logits = torch.randn(2, 5, 6, 6)
    target = torch.randint(0, 5, (2, 6, 6))
    target[0, 0] = 255
    expected = torch.nn.functional.cross_entropy(
        logits, target, weight=module.class_weight_out, ignore_index=255
    )
    torch.testing.assert_close(module.loss({"out": logits}, {"out": target}), expected)


def test_loss_sampling_keeps_about_p_of_the_pixels():
    torch.manual_seed(0)
    module = tiny_module(loss_reduction="sum", loss_sample_prob=0.25)
    logits = torch.randn(1, 5, 100, 100)
    target = torch.randint(0, 5, (1, 100, 100))
    full = module.loss({"out": logits}, {"out": target})
    sampled = module.loss({"out": logits}, {"out": target}, sample=True)
    assert 0.22 < float(sampled / full) < 0.28


def test_parameter_groups_follow_the_paper():
    module = tiny_module(
        optimizer={"name": "sgd", "lr": 1e-4, "momentum": 0.99, "weight_decay": 5e-4}
    )
    module.trainer = None
    opt = module.configure_optimizers()
    weights, biases = opt.param_groups
    assert weights["lr"] == 1e-4 and weights["weight_decay"] == 5e-4
    assert biases["lr"] == 2e-4 and biases["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in biases["params"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    head = module.model.heads["out"]
    assert id(head.upscore8.weight) not in in_opt  # the final upsampling is fixed
    assert id(head.upscore2.weight) in in_opt  # the intermediate ones learn
    assert opt.defaults["momentum"] == 0.99


def test_bad_solver_settings_are_named():
    with pytest.raises(ValueError, match="optimizer.name must be one of"):
        tiny_module(optimizer={"name": "rmsprop", "lr": 1.0}).configure_optimizers()
    with pytest.raises(ValueError, match="loss_reduction"):
        tiny_module(loss_reduction="median")
    with pytest.raises(ValueError, match="class_weights for head 'out' has 2 entries"):
        tiny_module(class_weights=[1.0, 2.0])


def test_two_heads_sum_losses_and_keep_metrics_apart(tmp_path):
    module = FCNModule(
        {"arch": "fcn16s", "heads": {"sem": 4, "geo": 3}, "width": 0.0625, "geometry": "same"}
    )
    logits = module(torch.randn(1, 3, 32, 32))
    targets = {"sem": torch.randint(0, 4, (1, 32, 32)), "geo": torch.randint(0, 3, (1, 32, 32))}
    total = module.loss(logits, targets)
    sem = torch.nn.functional.cross_entropy(logits["sem"], targets["sem"])
    geo = torch.nn.functional.cross_entropy(logits["geo"], targets["geo"])
    torch.testing.assert_close(total, sem + geo)
    assert (
        module.monitor == "val/sem/mIoU"
        and module.tag("val", "geo", "pixel_acc") == "val/geo/pixel_acc"
    )
    assert set(module.metrics["val"]) == {"sem", "geo"}


def test_gpu_speed_switches_are_ignored_on_cpu(tmp_path):
    module = tiny_module(channels_last=True, compile="max-autotune")
    t = trainer(
        tmp_path,
        max_steps=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
    )
    t.fit(module, tiny_data(train_size=4))
    assert not module._channels_last and not getattr(module, "_compiled", False)
    assert module.model.trunk.features[0].weight.is_contiguous()  # not converted to channels_last
    assert module.hparams.compile == "max-autotune"  # kept for a GPU resume


# --------------------------------------------------------------------------- validation panels
def _panels(t: pl.Trainer, tag: str = "val/predictions") -> list:
    events = EventAccumulator(str(t.logger.log_dir), size_guidance={"images": 0})
    events.Reload()
    return events.Images(tag) if tag in events.Tags()["images"] else []


def test_panel_takes_validation_images_of_different_sizes(tmp_path):
    # PASCAL VOC mixes landscape and portrait images; validation sees each whole, one per batch
    from helpers.datasets import write_folder

    root = tmp_path / "data"
    for i, size in (("land", (24, 40)), ("port", (40, 24)), ("small", (20, 20))):
        write_folder(root, [i], ["background", "a", "b"], size=size, seed=len(i))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("land\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("land\nport\nsmall\n")
    from fcn_lightning.data import FolderDataModule

    data = FolderDataModule(
        root, batching="whole", batch_size=1, val_batch_size=1, scale_range=None
    )
    module = tiny_module(model={"num_classes": 3})
    t = trainer(tmp_path, max_epochs=1, panels=ValidationImages(panel_size=3))
    t.fit(module, data)
    (panel,) = _panels(t)
    # three images of three sizes in one labelled figure (its layout: tests/test_board.py)
    assert panel.width >= 400 and (tmp_path / "figures" / "predictions.png").is_file()


@pytest.mark.parametrize(
    "every_val,every_images,epochs,expected",
    [(4, 4, 8, 1), (3, 2, 9, 2), (1, 3, 4, 2), (2, 1, 4, 2)],
)
def test_panels_follow_validation_runs_not_epoch_indices(
    tmp_path, every_val, every_images, epochs, expected
):
    # validation after epochs every_val-1, 2*every_val-1, ...: panels on runs 0, n, 2n, ...
    module = tiny_module()
    panels = ValidationImages(panel_size=1, every_n_validations=every_images)
    t = trainer(tmp_path, max_epochs=epochs, check_val_every_n_epoch=every_val, panels=panels)
    t.fit(module, tiny_data(train_size=4, image_size=32))
    assert len(_panels(t)) == expected
    assert len(_panels(t, "val/confusion_matrix")) == expected


def test_poly_schedule_follows_the_paper_formula_in_closed_form():
    from fcn_lightning.optim import build_optimizer, build_scheduler

    params = {
        "weight": [torch.nn.Parameter(torch.zeros(2, 2))],
        "bias": [torch.nn.Parameter(torch.zeros(2))],
    }
    opt = build_optimizer({"name": "sgd", "lr": 0.1}, params)
    assert [g["name"] for g in opt.param_groups] == ["weights", "biases"]
    sched = build_scheduler({"name": "poly", "power": 0.9}, opt, 10)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert "lr_lambdas" not in sched.state_dict() or not any(sched.state_dict()["lr_lambdas"])
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * (1 - t / 10) ** 0.9 for t in range(10)])
    assert build_scheduler({"name": "fixed"}, opt, lambda: 1 / 0) is None  # no length needed
    with pytest.raises(ValueError, match="scheduler.gamma is not a setting of scheduler=poly"):
        build_scheduler({"name": "poly", "gamma": 0.5}, opt, 10)
