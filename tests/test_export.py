"""export.py: checkpoints exported to ONNX and to an ExportedProgram, checked here against the
checkpoint's PyTorch model at sizes of their own (not only by the command's own check), with
their sidecars, the habits of the command, and the onnxruntime snippet of docs/DEPLOYING.md."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import ROOT, cfg_of
from helpers.launcher import commands
from PIL import Image

import fcn_lightning.app.export as export_module
from fcn_lightning.app.export import export, metadata, normalize, read_metadata
from fcn_lightning.contract import DataContract
from fcn_lightning.data.nyud import NYUD_CLASSES
from fcn_lightning.data.readers import read_image
from fcn_lightning.data.siftflow import SiftFlowDataModule
from fcn_lightning.errors import ConfigError, ExportError
from fcn_lightning.module import FCNModule, load_checkpoint
from fcn_lightning.normalization import LOG_DEPTH_MEANS

TINY = {"width": 1 / 16, "dropout": 0.0}
# torchvision's FCN on a ResNet-50 dilated to output stride 8, its auxiliary head on
TORCHVISION_OS8 = {
    "arch": "fcn_torchvision", "backbone": "resnet50", "geometry": "same", "output_stride": 8,
    "aux_weight": 0.4,
}  # fmt: skip
SIZES = [(1, 50, 67), (3, 97, 41)]  # (batch, H, W): not the command's sizes
ATOL = 1e-4
NYUD_RGB_HHA = DataContract.for_classes(
    {"out": NYUD_CLASSES}, inputs=[("rgb", "nyud"), ("hha", "nyud")], streams={"rgb": 3, "hha": 3}
)


def checkpoint(
    path: Path, contract: DataContract | None = None, scale: float = 1.0, **model
) -> Path:
    """A tiny checkpoint whose (zero-initialised) score layers are random: non-trivial logits;
    ``scale`` scales the score layers (so the logits) as a net's trained to tiny logits."""
    module = FCNModule({**TINY, **model}, contract=contract)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "score" in name:
                p.normal_(0, 0.2)
            if ".score_" in name:
                p.mul_(scale)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def export_cfg(ckpt: Path, fmt: str, out: Path, *more: str):
    return cfg_of(
        "export", [f"ckpt_path={ckpt}", f"format={fmt}", f"output={out}", *more], out.parent
    )


def exported(tmp: Path, fmt: str, name: str, *more: str, contract=None, **model) -> tuple:
    """(checkpoint, model file, sidecar, returned metadata) of an export run in-process."""
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(tmp / f"{name}.ckpt", contract, **model)
    suffix = ".onnx" if fmt == "onnx" else ".pt2"
    out = tmp / "deploy" / f"{name}{suffix}"
    meta = export(export_cfg(ckpt, fmt, out, *more))
    return ckpt, out, out.with_name(out.name + ".json"), meta


def loaded(path: Path) -> tuple:
    """(the model file as a deployer runs it: input -> {head: array}, its metadata)."""
    if path.suffix == ".onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        meta = session.get_modelmeta().custom_metadata_map["fcn_lightning"]

        def run_onnx(x: torch.Tensor) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(None, {"image": x.numpy()}), strict=True))

        return run_onnx, json.loads(meta)
    extra = {"fcn_lightning.json": ""}
    net = torch.export.load(str(path), extra_files=extra).module()

    def run_program(x: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: v.numpy() for k, v in net(x).items()}

    return run_program, json.loads(extra["fcn_lightning.json"])


def assert_equal_to_checkpoint(ckpt: Path, path: Path) -> dict:
    """Returns the metadata inside the model file."""
    module = load_checkpoint(ckpt).eval()
    heads = list(module.contract)
    run_file, meta = loaded(path)
    for n, h, w in SIZES:
        g = torch.Generator().manual_seed(h)
        x = torch.randn(n, module.contract.in_channels, h, w, generator=g)
        with torch.no_grad():
            want = module.model(x)
        got = run_file(x)
        assert list(got) == heads
        for head in heads:
            assert got[head].shape == (n, module.contract.num_classes[head], h, w)
            assert float(want[head].abs().max()) > 0.1  # not all zeros: the check means something
            assert np.abs(got[head] - want[head].numpy()).max() < ATOL, (path.name, head, (h, w))
    return meta


# --------------------------------------------------------------------------- shared exports
@pytest.fixture(scope="module")
def fcn8s_onnx(tmp_path_factory):
    """FCN-8s, paper geometry, caffe normalisation (BGR, 0..255 minus the VOC mean)."""
    return exported(
        tmp_path_factory.mktemp("fcn8s"), "onnx", "fcn8s", arch="fcn8s", geometry="paper",
        normalization="caffe",
    )  # fmt: skip


@pytest.fixture(scope="module")
def sift_onnx(tmp_path_factory):
    return exported(
        tmp_path_factory.mktemp("sift"), "onnx", "sift", contract=SiftFlowDataModule.contract,
        arch="fcn16s", geometry="same", normalization="caffe",
    )  # fmt: skip


# --------------------------------------------------------------------------- equal to the checkpoint
@pytest.mark.xdist_group("export_fcn8s_onnx")  # one worker computes the module fixture once
def test_fcn8s_to_onnx_equals_the_checkpoint(fcn8s_onnx):
    ckpt, out, _, _ = fcn8s_onnx
    assert_equal_to_checkpoint(ckpt, out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    shape = session.get_inputs()[0].shape
    assert shape[1] == 3 and all(isinstance(shape[i], str) for i in (0, 2, 3))  # dynamic


def test_two_headed_fcn16s_to_onnx_equals_the_checkpoint(sift_onnx):
    ckpt, out, sidecar, _ = sift_onnx
    assert_equal_to_checkpoint(ckpt, out)
    meta = json.loads(sidecar.read_text())
    assert list(meta["outputs"]) == ["sem", "geo"]
    contract = SiftFlowDataModule.contract
    for head in ("sem", "geo"):
        assert meta["outputs"][head]["class_names"] == contract.class_names(head)
    assert meta["model"]["output_stride"] == 16


@pytest.mark.parametrize(
    ("name", "model", "contract"),
    [
        ("fcn8s_same", {"arch": "fcn8s", "geometry": "same"}, None),
        ("sift_same", {"arch": "fcn16s", "geometry": "same"}, SiftFlowDataModule.contract),
        ("torchvision_os8", TORCHVISION_OS8, None),  # without its auxiliary output
    ],
)
def test_exported_program_equals_the_checkpoint(tmp_path, name, model, contract):
    ckpt, out, sidecar, _ = exported(tmp_path, "exported_program", name, contract=contract, **model)
    inside = assert_equal_to_checkpoint(ckpt, out)
    assert inside == json.loads(sidecar.read_text())


def test_alexnet_fcn32s_to_an_exported_program(tmp_path):
    ckpt, out, _, _ = exported(
        tmp_path, "exported_program", "alex", arch="fcn32s", geometry="paper", backbone="alexnet"
    )
    assert_equal_to_checkpoint(ckpt, out)


def test_output_stride_8_fcn_torchvision_to_onnx_by_the_command(tmp_path):
    """torchvision's FCN on a ResNet-50 dilated to output stride 8, with an auxiliary head:
    export.py writes its plain forward (eval mode: no auxiliary output), checked by the command
    itself (onnxruntime against PyTorch at its two sizes), and here at other sizes and batches
    (height, width and batch dynamic: its interpolation to the input's size included)."""
    ckpt = checkpoint(tmp_path / "tv8.ckpt", **TORCHVISION_OS8)
    module = load_checkpoint(ckpt).eval()
    with torch.no_grad():  # the checkpoint's net has the auxiliary head
        assert list(module.model(torch.randn(1, 3, 40, 48), aux=True)) == ["out", "aux"]
    out = tmp_path / "deploy" / "tv8.onnx"
    # a process of its own, forked from helpers.launcher's server (train.py's imports done)
    args = [f"ckpt_path={ckpt}", "format=onnx", f"output={out}"]
    (result,) = commands([ROOT / "export.py", *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout
    assert "exported fcn_torchvision (resnet50, same geometry; heads out 21) to onnx" in said
    for n, h, w in ((1, 75, 93), (2, 112, 74)):  # the command's check, one line per input
        checked = re.search(
            rf"input {n}x3x{h}x{w} \(random\), head out: output \({n}, 21, {h}, {w}\), "
            r"max \|diff\| (\S+) \(.*; allowed (\S+)\); labels differ at 0 pixel\(s\)\n",
            said,
        )
        assert checked and float(checked[1]) <= float(checked[2]), said
    assert "head aux" not in said and "written: " in said
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["out"]
    shape = session.get_inputs()[0].shape
    assert shape[1] == 3 and all(isinstance(shape[i], str) for i in (0, 2, 3))  # dynamic
    meta = assert_equal_to_checkpoint(ckpt, out)  # other sizes: (1, 50, 67), (3, 97, 41)
    assert meta["model"] == {
        "arch": "fcn_torchvision", "backbone": "resnet50", "width": 0.0625, "geometry": "same",
        "output_stride": 8,
    }  # fmt: skip
    assert list(meta["outputs"]) == ["out"]


@pytest.mark.slow  # ~40 s: onnxscript translates GoogLeNet's many branches slowly
def test_googlenet_fcn32s_to_onnx(tmp_path):
    ckpt, out, _, _ = exported(
        tmp_path, "onnx", "goog", arch="fcn32s", geometry="same", backbone="googlenet"
    )
    assert_equal_to_checkpoint(ckpt, out)


def test_late_fusion_rgb_hha_to_onnx(tmp_path):
    ckpt, out, sidecar, _ = exported(
        tmp_path, "onnx", "fused", contract=NYUD_RGB_HHA, arch="fcn32s", geometry="same",
        normalization="caffe",
    )  # fmt: skip
    assert_equal_to_checkpoint(ckpt, out)
    meta = json.loads(sidecar.read_text())
    assert meta["input"]["channels"] == 6
    assert meta["input"]["streams"] == {"rgb": [0, 3], "hha": [3, 6]}
    module = load_checkpoint(ckpt)
    rgb, hha = meta["input"]["groups"]
    assert (rgb["kind"], hha["kind"]) == ("rgb", "hha")
    for group, norm in zip((rgb, hha), module.input_normalizations, strict=True):
        assert group["normalization"]["mean"] == list(norm.mean)
        assert group["normalization"]["bgr"] == norm.bgr
    assert rgb["normalization"]["bgr"] and not hha["normalization"]["bgr"]


# --------------------------------------------------------------------------- the metadata
@pytest.mark.xdist_group("export_fcn8s_onnx")  # one worker computes the module fixture once
def test_the_sidecar_says_what_a_deployer_needs(fcn8s_onnx):
    ckpt, out, sidecar, returned = fcn8s_onnx
    meta = json.loads(sidecar.read_text())
    assert meta == returned == read_metadata(out)  # the same inside the model
    module = load_checkpoint(ckpt)
    (group,) = meta["input"]["groups"]
    norm = module.input_normalizations[0]
    assert {k: group["normalization"][k] for k in ("mean", "std", "scale", "bgr")} == {
        "mean": list(norm.mean), "std": list(norm.std), "scale": norm.scale, "bgr": norm.bgr,
    }  # fmt: skip
    assert group["normalization"]["mean"] == [104.00699, 116.66877, 122.67891]  # caffe, VOC
    assert group["normalization"]["bgr"] is True and group["normalization"]["scale"] == 255
    assert meta["outputs"]["out"]["class_names"] == module.contract.class_names("out")
    assert meta["outputs"]["out"]["palette"][:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert meta["ignore_index"] == 255
    assert meta["model"] == {
        "arch": "fcn8s", "backbone": "vgg16", "width": 0.0625, "geometry": "paper",
        "output_stride": 8,
    }  # fmt: skip
    assert meta["checkpoint"] == {
        "file": ckpt.name, "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
    }  # fmt: skip
    assert meta["input"]["name"] == "image" and meta["format"] == "onnx"
    # data only: no sentences, no path of the machine that exported it
    text = json.dumps(meta)
    assert str(ckpt.parent) not in text and str(Path.home()) not in text
    assert not [s for s in strings(meta) if len(s.split()) > 2], "a sentence in the metadata"
    assert meta == read_metadata(out)


def strings(value) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_the_sidecar_says_how_depth_is_encoded(tmp_path):
    contract = DataContract.for_classes(
        {"out": NYUD_CLASSES}, inputs=[("rgb", "nyud"), ("depth", "nyud")]
    )
    ckpt = checkpoint(tmp_path / "rgbd.ckpt", contract, arch="fcn32s", normalization="caffe")
    meta = metadata(load_checkpoint(ckpt), ckpt, "onnx", tmp_path / "rgbd.onnx")
    rgb, depth = meta["input"]["groups"]
    assert rgb["normalization"]["mean"] == [116.190, 97.203, 92.318]  # NYUDv2's colour mean
    assert depth["image"] is False and depth["channels"] == [3, 4]
    # read_depth's: log(max(depth in mm, 1)) minus NYUDv2's mean log depth
    assert depth["encoding"] == {"unit": "mm", "log": True, "min": 1.0, "minus": 7.844}
    assert depth["encoding"]["minus"] == LOG_DEPTH_MEANS["nyud"]
    assert "normalization" not in depth and "encoding" not in rgb


# --------------------------------------------------------------------------- docs/DEPLOYING.md
def deploying_snippet() -> str:
    text = (ROOT / "docs" / "DEPLOYING.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (snippet,) = [b for b in blocks if "InferenceSession" in b]
    return snippet


@pytest.mark.xdist_group("export_fcn8s_onnx")  # one worker computes the module fixture once
def test_the_deploying_snippet_runs_and_labels_as_the_checkpoint(fcn8s_onnx, tmp_path, monkeypatch):
    ckpt, out, sidecar, _ = fcn8s_onnx
    shutil.copy(out, tmp_path / "model.onnx")
    shutil.copy(sidecar, tmp_path / "model.onnx.json")
    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((9, 9, 1))).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    exec(compile(deploying_snippet(), "docs/DEPLOYING.md", "exec"), {})
    with Image.open(tmp_path / "photo_labels.png") as png:
        assert png.mode == "P"
        labels = np.asarray(png)
        assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    # the checkpoint's labels for the image as predict.py reads and normalises it
    module = load_checkpoint(ckpt).eval()
    with Image.open(tmp_path / "photo.jpg") as img:
        decoded = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    with torch.no_grad():
        want = module.model(normalize(decoded[None].float() / 255, module))["out"][0].argmax(0)
    assert labels.shape == (54, 72)
    assert len(np.unique(labels)) > 1
    assert (labels == want.numpy()).mean() > 0.999


@pytest.mark.xdist_group("export_fcn8s_onnx")  # one worker computes the module fixture once
def test_the_readme_snippet_runs_and_labels_as_the_checkpoint(fcn8s_onnx, tmp_path, monkeypatch):
    ckpt, out, sidecar, _ = fcn8s_onnx
    (tmp_path / "deploy").mkdir()
    shutil.copy(out, tmp_path / "deploy" / "fcn8s.onnx")
    shutil.copy(sidecar, tmp_path / "deploy" / "fcn8s.onnx.json")
    rng = np.random.default_rng(1)
    photo = np.kron(rng.integers(0, 256, (5, 7, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    readme = (ROOT / "README.md").read_text().split("## Deploying", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    module = load_checkpoint(ckpt).eval()
    with Image.open(tmp_path / "photo.jpg") as img:
        decoded = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    with torch.no_grad():
        want = module.model(normalize(decoded[None].float() / 255, module))["out"][0].argmax(0)
    assert scope["labels"].shape == (40, 56) and len(np.unique(scope["labels"])) > 1
    assert (scope["labels"] == want.numpy()).mean() > 0.999


@pytest.mark.xdist_group("export_fcn8s_onnx")  # one worker computes the module fixture once
@pytest.mark.parametrize("kind", ["16-bit grey PNG", "EXIF-rotated JPEG"])
def test_the_deploying_snippet_reads_images_as_predict_does(
    kind, fcn8s_onnx, tmp_path, monkeypatch
):
    ckpt, out, sidecar, _ = fcn8s_onnx
    shutil.copy(out, tmp_path / "model.onnx")
    shutil.copy(sidecar, tmp_path / "model.onnx.json")
    rng = np.random.default_rng(2)
    photo = tmp_path / "photo.jpg"  # the snippet's name; Pillow reads the content, not the suffix
    if kind == "16-bit grey PNG":
        grey = (rng.integers(0, 64, (6, 5)) * 1000).astype(np.uint16)
        Image.fromarray(np.kron(grey, np.ones((7, 7), np.uint16))).save(photo, format="PNG")
    else:
        rgb = np.kron(rng.integers(0, 256, (5, 8, 3)), np.ones((6, 6, 1))).astype(np.uint8)
        image = Image.fromarray(rgb)
        exif = image.getexif()
        exif[0x0112] = 6  # orientation: turn 90 degrees to be viewed
        image.save(photo, quality=95, exif=exif)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(deploying_snippet(), "docs/DEPLOYING.md", "exec"), scope)
    module = load_checkpoint(ckpt).eval()
    pixels = read_image(photo, exif_transpose=True)  # as predict.py reads it
    want = normalize(pixels[None].float() / 255, module).numpy()
    assert scope["x"].shape == want.shape
    # predict.py rounds 16-bit values to 8 bits: half a step on the 0..255 scale at most
    assert np.abs(scope["x"] - want).max() <= 0.51


# --------------------------------------------------------------------------- habits
def test_a_test_image_and_a_failed_check_leave_no_model(tmp_path, capsys, monkeypatch):
    ckpt = checkpoint(tmp_path / "net.ckpt", arch="fcn32s", geometry="same")
    Image.fromarray(np.full((40, 57, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    out = tmp_path / "deploy" / "net.pt2"
    args = [f"image={tmp_path / 'photo.png'}"]
    run_file = export_module.ExportedRunner.__call__

    def faulty(self, x):  # an export that is off by a little: what the check is there to catch
        return {head: y + 1e-2 for head, y in run_file(self, x).items()}

    with monkeypatch.context() as m:
        m.setattr(export_module.ExportedRunner, "__call__", faulty)
        with pytest.raises(ExportError, match="differs from the checkpoint") as err:
            export(export_cfg(ckpt, "exported_program", out, *args))
    assert "head out" in str(err.value) and "max |diff| above the allowed" in str(err.value)
    assert not out.parent.exists()  # no model, no temporary file, not the folder it made
    printed = capsys.readouterr().out
    assert "input 1x3x40x57 (photo.png)" in printed and "photo.png resized" in printed
    # the same with the default tolerance passes; an existing output is refused...
    export(export_cfg(ckpt, "exported_program", out, *args))
    assert out.is_file() and out.with_name(out.name + ".json").is_file()
    with pytest.raises(ConfigError, match="already exist.*overwrite=true"):
        export(export_cfg(ckpt, "exported_program", out))
    # ...unless overwrite=true
    before = out.stat().st_mtime_ns
    export(export_cfg(ckpt, "exported_program", out, "overwrite=true"))
    assert out.stat().st_mtime_ns != before
    assert sorted(p.name for p in out.parent.iterdir()) == ["net.pt2", "net.pt2.json"]
    # the other format of the same net beside it: each keeps its own sidecar
    export(export_cfg(ckpt, "onnx", out.with_suffix(".onnx")))
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "net.onnx", "net.onnx.json", "net.pt2", "net.pt2.json",
    ]  # fmt: skip


def test_settings_that_cannot_work_are_refused_before_any_work(tmp_path):
    ckpt = checkpoint(tmp_path / "net.ckpt", arch="fcn32s", geometry="same")
    out = tmp_path / "net.onnx"
    with pytest.raises(ConfigError, match=r"format must be one of \('onnx', 'exported_program'\)"):
        export(export_cfg(ckpt, "tflite", out))
    with pytest.raises(ConfigError, match="ckpt_path is not set"):
        export(cfg_of("export", [f"output={out}"], tmp_path))
    with pytest.raises(ConfigError, match="checkpoint not found"):
        export(export_cfg(tmp_path / "nope.ckpt", "onnx", out))
    with pytest.raises(ConfigError, match="the checkpoint itself"):
        export(export_cfg(ckpt, "onnx", ckpt))
    with pytest.raises(ConfigError, match=r"does not end in \.onnx.*format=exported_program"):
        export(export_cfg(ckpt, "onnx", tmp_path / "net.pt2"))
    with pytest.raises(ConfigError, match=r"does not end in \.pt2"):
        export(export_cfg(ckpt, "exported_program", tmp_path / "net.model"))
    with pytest.raises(ConfigError, match="is a folder"):
        export(export_cfg(ckpt, "onnx", tmp_path))
    for bad in ("tolerance=abc", "tolerance=-1", "rtol=-0.1"):
        with pytest.raises(ConfigError, match="must be a number >= 0"):
            export(export_cfg(ckpt, "onnx", out, bad))
    with pytest.raises(ConfigError, match="is a folder; name a checkpoint file"):
        export(export_cfg(tmp_path, "onnx", out))
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ConfigError, match="dict.pt is not a checkpoint written by fcn-lightning"):
        export(export_cfg(tmp_path / "dict.pt", "onnx", out))
    (tmp_path / "dict.pt").unlink()
    (tmp_path / "net.onnx.json").write_text("{}")  # someone's file where the sidecar would go
    with pytest.raises(ConfigError, match="net.onnx.json already exist"):
        export(export_cfg(ckpt, "onnx", out))
    fused = checkpoint(tmp_path / "fused.ckpt", NYUD_RGB_HHA, arch="fcn32s", geometry="same")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "p.png")
    with pytest.raises(ConfigError, match="takes 6 input channels.*leave image= out"):
        export(export_cfg(fused, "onnx", tmp_path / "f.onnx", f"image={tmp_path / 'p.png'}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fused.ckpt", "net.ckpt", "net.onnx.json", "p.png",
    ]  # fmt: skip


def test_without_onnx_the_message_says_what_to_install(tmp_path, monkeypatch):
    real = export_module.importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(export_module.importlib, "import_module", without_onnxruntime)
    ckpt = checkpoint(tmp_path / "net.ckpt", arch="fcn32s", geometry="same")
    with pytest.raises(ConfigError, match=re.escape('pip install -e ".[export]"')):
        export_module.export(export_cfg(ckpt, "onnx", tmp_path / "net.onnx"))


def test_the_command_line(tmp_path):
    ckpt = checkpoint(tmp_path / "net.ckpt", arch="fcn8s_atonce", geometry="same")
    out = tmp_path / "new" / "folder" / "net.onnx"
    # a process of its own, forked from helpers.launcher's server (train.py's imports done)
    args = [f"ckpt_path={ckpt}", "format=onnx", f"output={out}"]
    (result,) = commands([ROOT / "export.py", *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "input 2x3x112x74 (random), head out: output (2, 21, 112, 74)" in result.stdout
    assert "written: " in result.stdout and not result.stderr.strip()
    assert out.is_file() and out.with_name(out.name + ".json").is_file()
    assert_equal_to_checkpoint(ckpt, out)


# --------------------------------------------------------------------------- tiny logits
def test_tiny_logits_are_checked_at_their_own_scale(tmp_path, capsys, monkeypatch):
    """An NYUD net's logits can be ~1e-7: an absolute 1e-4 would pass any export of it. The
    allowance follows the logits' spread, and the labels must agree."""
    ckpt = checkpoint(tmp_path / "tiny.ckpt", scale=4e-8, arch="fcn32s", geometry="same")
    with torch.no_grad():
        logits = load_checkpoint(ckpt).eval().model(torch.randn(1, 3, 40, 50))["out"]
    assert 1e-8 < float(logits.abs().max()) < 1e-6
    out = tmp_path / "deploy" / "tiny.pt2"
    run_file = export_module.ExportedRunner.__call__

    def flipping(self, x):  # off by a few times the logits' spread on class 0: other labels
        outs = run_file(self, x)
        for y in outs.values():
            y[:, 0] += 3 * float(y.std())
        return outs

    with monkeypatch.context() as m:
        m.setattr(export_module.ExportedRunner, "__call__", flipping)
        with pytest.raises(ExportError, match="differs from the checkpoint") as err:
            export(export_cfg(ckpt, "exported_program", out))
    assert re.search(r"labels differ at [1-9]\d* pixel\(s\) that are no ties", str(err.value))
    assert "max |diff| above the allowed" in str(err.value)
    assert not out.parent.exists()
    capsys.readouterr()
    export(export_cfg(ckpt, "exported_program", out))  # the faithful export passes
    printed = capsys.readouterr().out
    assert "labels differ at 0 pixel(s)" in printed and out.is_file()
    allowed = [float(a) for a in re.findall(r"allowed ([-+.e\d]+)\)", printed)]
    assert len(allowed) == 2 and all(0 < a < 1e-9 for a in allowed)  # not 1e-4


class Fixed:
    """A model or runner that returns the same logits for any input."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, x):
        return {"out": self.logits}


def test_labels_must_agree_but_at_ties():
    """Within the allowed difference a label may flip only where the checkpoint's top two logits
    are within the allowed of each other (a tie); elsewhere the labels fail the check."""
    ref = torch.tensor([[[[8.0, -8.0, 0.0, 0.0]], [[-8.0, 8.0, 0.0, 0.0]]]])  # (1, 2, 1, 4)
    allowed = 0.1 * float(ref.double().std(correction=0))  # tolerance=0.1, rtol=0
    tie, apart = 0.5 * allowed, 1.5 * allowed
    ref[0, :, 0, 2] = torch.tensor([tie / 2, -tie / 2])
    ref[0, :, 0, 3] = torch.tensor([apart / 2, -apart / 2])
    allowed = 0.1 * float(ref.double().std(correction=0))
    assert tie < allowed < apart < 2 * allowed
    inputs = [("random", torch.zeros(1, 3, 1, 4))]
    for pixel, fails in ((2, False), (3, True)):
        out = ref.clone()
        out[0, :, 0, pixel] += torch.tensor([-0.95, 0.95]) * allowed  # max |diff| within
        assert out[0, :, 0, pixel].argmax() != ref[0, :, 0, pixel].argmax()
        if not fails:
            export_module.compare(Fixed(out), Fixed(ref), inputs, 0.1, 0.0)
            continue
        with pytest.raises(ExportError, match="differs from the checkpoint") as err:
            export_module.compare(Fixed(out), Fixed(ref), inputs, 0.1, 0.0)
        assert "labels differ at 1 pixel(s) that are no ties" in str(err.value)
        assert "max |diff| above" not in str(err.value)


# --------------------------------------------------------------------------- unwritable output
def simulate(monkeypatch, under: Path, code: int) -> None:
    """Creating a file or folder inside ``under`` fails with ``code`` (for root, whom a
    read-only mode does not stop, and for a full disk)."""

    def refusing(real):
        def call(path, *args, **kwargs):
            if (p := Path(os.fsdecode(path))).is_relative_to(under) and p != under:
                raise OSError(code, os.strerror(code), str(p))
            return real(path, *args, **kwargs)

        return call

    for name in ("open", "mkdir"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name)))


def test_an_output_folder_it_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "net.ckpt", arch="fcn32s", geometry="same")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with monkeypatch.context() as m:
            if os.access(read_only, os.W_OK):  # root: the mode does not stop it
                simulate(m, read_only, errno.EACCES)
            m.setattr(export_module, "load_module", lambda *a: pytest.fail("work started"))
            with pytest.raises(ConfigError) as err:
                export(export_cfg(ckpt, "onnx", read_only / "net.onnx"))
            assert str(err.value).startswith(f"output folder {read_only} is read-only (")
            with pytest.raises(ConfigError) as err:
                export(export_cfg(ckpt, "onnx", read_only / "new" / "net.onnx"))
            assert str(err.value).startswith(
                f"output folder {read_only / 'new'} cannot be created: {read_only} is read-only ("
            )
        assert list(read_only.iterdir()) == []
        # a full disk: the folders it made are removed again
        with monkeypatch.context() as m:
            simulate(m, tmp_path / "new", errno.ENOSPC)
            m.setattr(export_module, "load_module", lambda *a: pytest.fail("work started"))
            with pytest.raises(ConfigError) as err:
                export(export_cfg(ckpt, "onnx", tmp_path / "new" / "sub" / "net.onnx"))
        assert str(err.value).startswith(
            f"output folder {tmp_path / 'new' / 'sub'} cannot be created: {tmp_path / 'new'} is "
            "not writable (disk full: No space left on device)"
        )
        with monkeypatch.context() as m:
            new = tmp_path / "new" / "sub"
            simulate(m, new, errno.ENOSPC)  # the folders can be made, not a file in them
            with pytest.raises(ConfigError, match=re.escape(
                f"output folder {new} is not writable (disk full: No space left on device)"
            )):  # fmt: skip
                export(export_cfg(ckpt, "onnx", new / "net.onnx"))
    finally:
        read_only.chmod(stat.S_IRWXU)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.ckpt", "ro"]


def test_a_full_disk_while_writing_leaves_what_was_there(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "net.ckpt", arch="fcn32s", geometry="same")
    out = tmp_path / "deploy" / "net.pt2"
    sidecar = out.with_name(out.name + ".json")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def half_then_full(f):
        f.write(b"half a model")
        raise full

    with monkeypatch.context() as m:  # the model's write fills the disk
        m.setattr(export_module, "writer", lambda *a: half_then_full)
        with pytest.raises(ConfigError) as err:
            export(export_cfg(ckpt, "exported_program", out))
    assert str(err.value).startswith(f"could not write {out}: disk full (No space left")
    assert not out.parent.exists()  # no partial file, not the folder it made
    export(export_cfg(ckpt, "exported_program", out))
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    with monkeypatch.context() as m:  # overwrite=true, and the sidecar's write fills the disk
        m.setattr(export_module, "write_json_atomic",
                  lambda path, data: export_module.write_atomically(path, half_then_full))  # fmt: skip
        with pytest.raises(ConfigError) as err:
            export(export_cfg(ckpt, "exported_program", out, "overwrite=true"))
    assert str(err.value).startswith(f"could not write {sidecar}: disk full (No space left")
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


# --------------------------------------------------------------------------- progress
def test_an_export_shows_its_phases_on_a_terminal(tmp_path, capsys, monkeypatch):
    ckpt = checkpoint(tmp_path / "net.ckpt", arch="fcn32s", geometry="same")
    monkeypatch.setattr(export_module.console, "on_terminal", lambda: True)
    export(export_cfg(ckpt, "onnx", tmp_path / "net.onnx"))
    shown = capsys.readouterr()
    bar = shown.err.replace("\r", "\n")
    for phase in ("export the graph", "translate to ONNX", "write the model", "check on 2 inputs",
                  "put in place"):  # fmt: skip
        assert f"export: {phase} | phase" in bar, phase
    assert re.search(r"phase \d/5 done .*\d\d:\d\d", bar)  # with the elapsed time
    assert "head out: output (1, 21, 75, 93)" in shown.out and "written: " in shown.out
