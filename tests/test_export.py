"""export.py: checkpoints exported to ONNX and to an ExportedProgram, checked here against the
checkpoint's PyTorch model at sizes of their own (not only by the command's own check), with
their sidecars, the habits of the command, and the onnxruntime snippet of docs/DEPLOYING.md."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
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
SIZES = [(1, 50, 67), (3, 97, 41)]  # (batch, H, W): not the command's sizes
ATOL = 1e-4
NYUD_RGB_HHA = DataContract.for_classes(
    {"out": NYUD_CLASSES}, inputs=[("rgb", "nyud"), ("hha", "nyud")], streams={"rgb": 3, "hha": 3}
)


def checkpoint(path: Path, contract: DataContract | None = None, **model) -> Path:
    """A tiny checkpoint whose (zero-initialised) score layers are random: non-trivial logits."""
    module = FCNModule({**TINY, **model}, contract=contract)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "score" in name:
                p.normal_(0, 0.2)
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
    assert "head out" in str(err.value)
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no model, no temporary file
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
