"""The reference's input statistics per dataset and input kind (docs/PAPER.md, "Input
statistics"): what each DataModule's loader yields under ``caffe`` and ``imagenet``, what the
model and its checkpoint record, and that eval.py, predict.py, the panels and the late-fusion
stream check use the recorded statistics.

The expected numbers are written out here, not read from the package's table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import cfg_of
from helpers.datasets import SIFT_SUBDIR, write_folder, write_nyud, write_siftflow, write_voc
from PIL import Image

from fcn_lightning.app.board import ValidationImages
from fcn_lightning.app.evaluate import evaluate
from fcn_lightning.app.predict import input_normalization, predict
from fcn_lightning.checkpoints import check_stream_checkpoints
from fcn_lightning.contract import DataContract, Head, InputGroup
from fcn_lightning.data import (
    FolderDataModule,
    NYUDDataModule,
    SiftFlowDataModule,
    SyntheticDataModule,
    VOCDataModule,
    render_scene,
)
from fcn_lightning.errors import CheckpointError, ConfigError
from fcn_lightning.module import FCNModule, load_checkpoint

# The reference's means on 0..255 values, in the order the network sees them.
VOC_BGR = (104.00699, 116.66877, 122.67891)
NYUD_BGR = (116.190, 97.203, 92.318)
NYUD_HHA = (132.431, 94.076, 118.477)  # the HHA file's own channel order
SIFT_BGR = (114.578, 115.294, 108.353)
LOG_DEPTH = 7.844
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

WHOLE = {"batching": "pad", "crop_size": None, "scale_range": None, "hflip": False}
TINY = {"arch": "fcn32s", "width": 1 / 16, "geometry": "same", "dropout": 0.0}
ATOL = 2e-3  # float32 on values up to 255


# --------------------------------------------------------------------------- expectations
def decoded(path: Path) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of an image file as stored (a decoded JPEG's own values)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def photo(rgb: np.ndarray, scheme: str, mean_bgr=VOC_BGR) -> torch.Tensor:
    """(3, H, W): caffe = B, G, R on 0..255 minus ``mean_bgr``; imagenet = R, G, B in 0..1 minus
    the ImageNet mean, over its std."""
    x = rgb.astype(np.float64)
    if scheme == "caffe":
        out = x[..., ::-1] - np.array(mean_bgr)
    else:
        out = (x / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(out.transpose(2, 0, 1).copy()).float()


def hha(image: np.ndarray, scheme: str) -> torch.Tensor:
    """(3, H, W): caffe = the HHA file's channels in their own order minus the HHA mean (no
    swap); imagenet = as a photo."""
    if scheme == "imagenet":
        return photo(image, scheme)
    out = image.astype(np.float64) - np.array(NYUD_HHA)
    return torch.from_numpy(out.transpose(2, 0, 1).copy()).float()


def depth(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        mm = np.asarray(img, dtype=np.float64)
    return torch.from_numpy(np.log(mm) - LOG_DEPTH)[None].float()


def paint(path: Path, value, dtype=np.uint8) -> None:
    """Fill a PNG with one value per channel, keeping its size."""
    with Image.open(path) as img:
        w, h = img.size
    shape = (h, w, len(value)) if isinstance(value, tuple) else (h, w)
    Image.fromarray(np.full(shape, value, dtype=dtype)).save(path)


def tiny_checkpoint(path: Path, contract: DataContract, scheme: str) -> Path:
    module = FCNModule({**TINY, "normalization": scheme}, contract=contract)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture
def nyud(tmp_path):
    return write_nyud(
        tmp_path / "nyud", {"train": ["5001", "5002"], "val": ["5003"], "test": ["5004", "5005"]}
    )


@pytest.fixture
def sift(tmp_path):
    return write_siftflow(tmp_path / "sift", train=["coast_a1", "street_b2"], test=["coast_t1"])


# --------------------------------------------------------------------------- what the loaders yield
@pytest.mark.parametrize("scheme", ["caffe", "imagenet"])
def test_voc_photos_use_the_voc_mean(tmp_path, scheme):
    root = write_voc(tmp_path, 2012, {"train": ["2012_a"], "val": ["2012_b"]})
    dm = VOCDataModule(root, normalization=scheme, **WHOLE)
    dm.setup("validate")
    image, _ = dm.datasets["val"][0]
    rgb = decoded(root / "VOCdevkit/VOC2012/JPEGImages/2012_b.jpg")
    torch.testing.assert_close(image, photo(rgb, scheme, VOC_BGR), atol=ATOL, rtol=0)
    assert dm.contract.inputs[0].kind == "rgb" and dm.contract.inputs[0].stats == "voc"


@pytest.mark.parametrize("scheme", ["caffe", "imagenet"])
def test_folder_photos_use_the_voc_mean(tmp_path, scheme):
    root = write_folder(
        tmp_path, ["a", "b"], ["bg", "x", "y"], {"train": ["a"], "val": ["b"]}, ext=".png"
    )
    paint(root / "JPEGImages/b.png", (200, 100, 50))
    dm = FolderDataModule(root, normalization=scheme, **WHOLE)
    dm.setup("validate")
    image, _ = dm.datasets["val"][0]
    # one known pixel value, R, G, B = 200, 100, 50
    expected = {
        "caffe": [50 - 104.00699, 100 - 116.66877, 200 - 122.67891],
        "imagenet": [1.3070468, -0.2850140, -0.9329847],
    }[scheme]
    torch.testing.assert_close(image[:, 3, 5], torch.tensor(expected), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        image, photo(decoded(root / "JPEGImages/b.png"), scheme), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("scheme", ["caffe", "imagenet"])
def test_synthetic_scenes_use_the_voc_mean(scheme):
    dm = SyntheticDataModule(image_size=24, train_size=2, val_size=2, normalization=scheme)
    dm.setup("validate")
    image, _ = dm.datasets["val"][1]
    rgb, _ = render_scene(0, "val", 1, 24)
    torch.testing.assert_close(image, photo(rgb, scheme, VOC_BGR), atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheme", ["caffe", "imagenet"])
def test_siftflow_photos_use_the_siftflow_mean(sift, scheme):
    dm = SiftFlowDataModule(sift, normalization=scheme, **WHOLE)
    dm.setup("validate")
    image, _ = dm.datasets["val"][0]
    rgb = decoded(sift / "Images" / SIFT_SUBDIR / "coast_t1.jpg")
    torch.testing.assert_close(image, photo(rgb, scheme, SIFT_BGR), atol=ATOL, rtol=0)
    assert dm.contract.inputs[0].stats == "siftflow"


@pytest.mark.parametrize("scheme", ["caffe", "imagenet"])
@pytest.mark.parametrize("modality", ["rgb", "hha", "depth", "rgbd", "rgb+hha"])
def test_nyud_statistics_per_modality(nyud, modality, scheme):
    dm = NYUDDataModule(nyud, modality=modality, normalization=scheme, **WHOLE)
    dm.setup("validate")
    image, _ = dm.datasets["val"][0]  # img_5004, the first test image
    files = nyud / "data"
    groups = {
        "rgb": lambda: photo(decoded(files / "images/img_5004.png"), scheme, NYUD_BGR),
        "hha": lambda: hha(decoded(files / "hha/img_5004.png"), scheme),
        "depth": lambda: depth(files / "depth/img_5004.png"),
    }
    kinds = {"rgbd": ["rgb", "depth"], "rgb+hha": ["rgb", "hha"]}.get(modality, [modality])
    expected = torch.cat([groups[k]() for k in kinds])
    torch.testing.assert_close(image, expected, atol=ATOL, rtol=0)
    assert [g.kind for g in dm.contract.inputs] == kinds
    assert {g.stats for g in dm.contract.inputs} == {"nyud"} and dm.contract.modality == modality


@pytest.mark.parametrize("scheme", ["caffe", "imagenet"])
def test_a_late_fusion_batch_normalises_each_group_with_its_own_statistics(nyud, scheme):
    for i in ("5004", "5005"):  # known values: R, G, B = 200, 100, 50; HHA = 200, 100, 50
        paint(nyud / f"data/images/img_{i}.png", (200, 100, 50))
        paint(nyud / f"data/hha/img_{i}.png", (200, 100, 50))
    dm = NYUDDataModule(nyud, modality="rgb+hha", normalization=scheme, **WHOLE, val_batch_size=2)
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 6, 30, 40)
    if scheme == "caffe":
        colour = [50 - 116.190, 100 - 97.203, 200 - 92.318]  # swapped to B, G, R
        hha_group = [200 - 132.431, 100 - 94.076, 50 - 118.477]  # not swapped
    else:  # ImageNet's, for both, as before
        colour = hha_group = [1.3070468, -0.2850140, -0.9329847]
    expected = torch.tensor(colour + hha_group)[None, :, None, None].expand_as(images)
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)


def test_known_depth_value(nyud):
    paint(nyud / "data/depth/img_5004.png", 1000, np.uint16)  # one metre
    for scheme in ("caffe", "imagenet"):
        dm = NYUDDataModule(nyud, modality="rgbd", normalization=scheme, **WHOLE)
        dm.setup("validate")
        image, _ = dm.datasets["val"][0]
        assert image[3].sub(math.log(1000) - 7.844).abs().max() < 1e-5  # -0.936


# --------------------------------------------------------------------------- model and data agree
def test_the_model_records_what_the_data_applies_stream_by_stream(nyud, tmp_path):
    dm = NYUDDataModule(nyud, modality="rgb+hha", normalization="caffe")
    module = FCNModule({**TINY, "normalization": "caffe"}, contract=dm.contract)
    assert module.input_normalizations == dm.input_normalizations
    streams = stream_normalizations(module)
    assert streams["rgb"].mean == NYUD_BGR and streams["rgb"].bgr
    assert streams["hha"].mean == NYUD_HHA and not streams["hha"].bgr
    assert module.model.streams["hha"].normalization == streams["hha"]
    assert module.model.normalization == streams["rgb"]
    # the checkpoint keeps them, and its contract says what the inputs were
    path = tmp_path / "fused.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    again = load_checkpoint(path)
    assert stream_normalizations(again) == streams
    assert again.contract.modality == "rgb+hha"
    assert [(g.kind, g.stats) for g in again.contract.inputs] == [("rgb", "nyud"), ("hha", "nyud")]
    x = torch.randn(1, 6, 32, 32)
    torch.testing.assert_close(again.eval()(x)["out"], module.eval()(x)["out"])
    # under imagenet every stream is ImageNet's, HHA too
    plain = FCNModule({**TINY, "normalization": "imagenet"}, contract=dm.contract)
    assert {n.mean for n in stream_normalizations(plain).values()} == {IMAGENET_MEAN}


def test_a_checkpoint_keeps_class_names_palette_and_outputs(tmp_path):
    names = ["background", "blob", "bar", "dot", "ring"]
    palette = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    contract = DataContract({"out": Head(tuple(names), tuple(palette))}, [InputGroup("rgb")])
    module = FCNModule({**TINY}, contract=contract)
    path = tmp_path / "m.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    again = load_checkpoint(path)
    assert again.contract == contract and again.contract.class_names("out") == names
    assert again.contract.heads["out"].palette[1] == (128, 0, 0)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x)["out"], module.eval()(x)["out"])


def stream_normalizations(module: FCNModule) -> dict:
    return {name: s.normalization for name, s in module.model.streams.items()}


def test_fitting_on_data_normalised_otherwise_is_refused(nyud):
    def attempt(module, dm):
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
        )  # fmt: skip
        trainer.validate(module, dm, verbose=False)

    contract = NYUDDataModule(nyud, modality="hha").contract
    module = FCNModule({**TINY, "normalization": "caffe"}, contract=contract)
    with pytest.raises(ValueError, match=r"hha: data imagenet .*, model channels as stored"):
        attempt(module, NYUDDataModule(nyud, modality="hha", normalization="imagenet", **WHOLE))
    rgb = FCNModule(
        {**TINY, "normalization": "caffe"}, contract=NYUDDataModule(nyud, modality="rgb").contract
    )
    with pytest.raises(ValueError, match=r"takes rgb input .* but the data gives hha input"):
        attempt(rgb, NYUDDataModule(nyud, modality="hha", normalization="caffe", **WHOLE))


def test_panels_show_the_colour_group_in_true_colours_and_hha_as_stored(nyud):
    dm = NYUDDataModule(nyud, modality="rgb+hha", normalization="caffe", **WHOLE)
    dm.setup("validate")
    module = FCNModule({**TINY, "normalization": "caffe"}, contract=dm.contract)
    image, _ = dm.datasets["val"][0]
    shown = ValidationImages._input(module, image)
    rgb = decoded(nyud / "data/images/img_5004.png")
    stored = decoded(nyud / "data/hha/img_5004.png")
    expected = torch.from_numpy(np.concatenate([rgb, stored], axis=1)).permute(2, 0, 1)
    assert shown.shape == (3, 30, 80)  # colour | HHA
    assert (shown.int() - expected.int()).abs().max() <= 1  # rounding of the float round trip


# --------------------------------------------------------------------------- eval and predict
def test_eval_feeds_a_caffe_hha_checkpoint_the_hha_statistics(nyud, tmp_path, monkeypatch):
    contract = NYUDDataModule(nyud, modality="hha").contract
    ckpt = tiny_checkpoint(tmp_path / "hha.ckpt", contract, "caffe")
    seen = capture(monkeypatch, "test_step")
    evaluate(cfg_of("eval", eval_args(nyud, ckpt, "hha"), tmp_path / "eval"))
    first = seen[0][0]  # img_5004
    torch.testing.assert_close(
        first, hha(decoded(nyud / "data/hha/img_5004.png"), "caffe"), atol=ATOL, rtol=0
    )
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_eval_refuses_an_rgb_checkpoint_on_hha_data(nyud, tmp_path):
    contract = NYUDDataModule(nyud, modality="rgb").contract
    ckpt = tiny_checkpoint(tmp_path / "rgb.ckpt", contract, "caffe")
    with pytest.raises(
        ConfigError,
        match=r"rgb.ckpt takes rgb input \(NYUDv2 statistics\) but the data gives hha input "
        r"\(NYUDv2 statistics\)[\s\S]*data.modality=rgb",
    ):
        evaluate(cfg_of("eval", eval_args(nyud, ckpt, "hha"), tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("data", ["siftflow", "nyud_hha"])
def test_predict_uses_the_checkpoints_statistics(data, nyud, sift, tmp_path, monkeypatch):
    if data == "siftflow":
        contract, mean = SiftFlowDataModule(sift).contract, SIFT_BGR
    else:
        contract, mean = NYUDDataModule(nyud, modality="hha").contract, NYUD_HHA
    ckpt = tiny_checkpoint(tmp_path / "net.ckpt", contract, "caffe")
    assert input_normalization(load_checkpoint(ckpt)).mean == mean
    photos = tmp_path / "in"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "a.png")
    seen = capture(monkeypatch, "predict_step")
    args = [f"ckpt_path={ckpt}", f"input={photos}", f"output={tmp_path / 'out'}", "device=cpu"]
    predict(cfg_of("predict", args, tmp_path / "p"))
    expected = photo(pixels, "caffe", SIFT_BGR) if data == "siftflow" else hha(pixels, "caffe")
    torch.testing.assert_close(seen[0][0], expected, atol=ATOL, rtol=0)


def eval_args(root: Path, ckpt: Path, modality: str) -> list[str]:
    return [
        "data=nyud", f"data.root={root}", f"data.modality={modality}", f"ckpt_path={ckpt}",
        "data.num_workers=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    ]  # fmt: skip


def capture(monkeypatch, step: str) -> list[torch.Tensor]:
    """The input images of every batch FCNModule's ``step`` is given."""
    seen: list[torch.Tensor] = []
    original = getattr(FCNModule, step)

    def spy(self, batch, *args, **kwargs):
        seen.append(batch[0].detach().clone())
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(FCNModule, step, spy)
    return seen


# --------------------------------------------------------------------------- late fusion's streams
@pytest.fixture
def stream_checkpoints(nyud, tmp_path):
    def of(modality: str, scheme: str = "caffe") -> Path:
        contract = NYUDDataModule(nyud, modality=modality).contract
        return tiny_checkpoint(tmp_path / f"{modality}-{scheme}.ckpt", contract, scheme)

    fused = FCNModule(
        {**TINY, "normalization": "caffe"},
        contract=NYUDDataModule(nyud, modality="rgb+hha").contract,
    )
    return of, fused


def test_stream_checkpoints_of_the_right_modality_pass(stream_checkpoints):
    of, fused = stream_checkpoints
    sources = {"rgb": of("rgb"), "hha": of("hha")}
    check_stream_checkpoints(sources, fused.contract, fused.input_normalizations)


def test_swapped_stream_checkpoints_are_refused_naming_both(stream_checkpoints):
    of, fused = stream_checkpoints
    rgb, hha_ckpt = of("rgb"), of("hha")
    with pytest.raises(
        CheckpointError,
        match=r"arch.init_streams.rgb: .*hha-caffe.ckpt was trained on hha input \(NYUDv2 "
        r"statistics\), but the rgb stream takes rgb input \(NYUDv2 statistics\) \(the hha "
        r"stream's checkpoint\? are the two swapped\?\)",
    ):
        check_stream_checkpoints(
            {"rgb": hha_ckpt, "hha": rgb}, fused.contract, fused.input_normalizations
        )


def test_a_stream_checkpoint_trained_with_other_statistics_is_refused(stream_checkpoints):
    of, fused = stream_checkpoints
    sources = {"rgb": of("rgb"), "hha": of("hha", "imagenet")}
    with pytest.raises(
        CheckpointError,
        match=r"arch.init_streams.hha: .*hha-imagenet.ckpt expects its hha input normalised "
        r"as imagenet .* but the hha stream is fed channels as stored, 0..255 minus mean "
        r"\[132.431, 94.076, 118.477\]",
    ):
        check_stream_checkpoints(sources, fused.contract, fused.input_normalizations)


def test_stream_checkpoints_of_bare_weights_are_not_compared(stream_checkpoints, tmp_path):
    of, fused = stream_checkpoints
    bare = tmp_path / "bare.pt"  # weights alone: nothing recorded to compare
    torch.save(torch.load(of("hha"), weights_only=True)["state_dict"], bare)
    imagenet = FCNModule({**TINY}, contract=fused.contract)
    check_stream_checkpoints(
        {"rgb": bare, "hha": of("hha", "imagenet")},
        imagenet.contract,
        imagenet.input_normalizations,
    )
    check_stream_checkpoints({"rgb": bare, "hha": bare}, fused.contract, fused.input_normalizations)
