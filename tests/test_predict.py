"""predict: never replaces or drops a user's file, skips what it cannot read, takes any image."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, cfg_of
from helpers.launcher import commands
from PIL import Image
from torchvision import tv_tensors

from fcn_lightning.app.common import as_command, load_module
from fcn_lightning.app.evaluate import evaluate
from fcn_lightning.app.export import export
from fcn_lightning.app.predict import MANIFEST, input_normalization, output_stems, predict
from fcn_lightning.data import eval_transforms, read_image
from fcn_lightning.errors import (
    ConfigError,
    DataError,
    ExportError,
    PretrainedWeightsUnavailable,
    RunInterrupted,
)
from fcn_lightning.module import FCNModule


@pytest.fixture(scope="module")
def ckpt(tiny_run) -> Path:
    return tiny_run[0] / "fcn16s" / "checkpoints" / "best.ckpt"


def run_predict(ckpt: Path, source: Path | str, output: Path | str | None) -> list[Path]:
    overrides = [f"ckpt_path={ckpt}", f"input={source}", "device=cpu"]
    if output is not None:
        overrides.append(f"output={output}")
    return predict(cfg_of("predict", overrides, Path(str(source)).parent / "run"))


def gradient(h: int, w: int) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it close): red down, green across, blue constant."""
    y, x = np.mgrid[0:h, 0:w]
    r, g = 255 * y / max(h - 1, 1), 255 * x / max(w - 1, 1)
    return np.stack([r, g, np.full_like(r, 90)], -1).round().astype(np.uint8)


def save(path: Path, h: int = 20, w: int = 30) -> Path:
    Image.fromarray(gradient(h, w)).save(path)
    return path


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(folder.iterdir())
    }


def label_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as label:
        assert label.mode == "P"
        return label.size


# --------------------------------------------------------------------------- never over an input
@pytest.mark.parametrize("how", ["same", "dot", "symlink", "dotdot", "trailing slash"])
def test_output_that_is_the_input_folder_is_refused(ckpt, tmp_path, monkeypatch, how):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "photo.png")
    save(photos / "cat.jpg")
    (photos / "sub").mkdir()
    (tmp_path / "link").symlink_to(photos)
    monkeypatch.chdir(photos)
    output = {
        "same": photos,
        "dot": ".",
        "symlink": tmp_path / "link",
        "dotdot": photos / "sub" / "..",
        "trailing slash": f"{photos}/",
    }[how]
    before = digests(photos)
    with pytest.raises(ValueError, match=r"is the input folder .*photos.*output=.*predictions"):
        run_predict(ckpt, photos, output)
    assert digests(photos) == before


def test_single_image_never_overwrites_itself(ckpt, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "photo.png")
    before = digests(photos)
    with pytest.raises(ValueError, match=r"would overwrite the input image .*photo.png"):
        run_predict(ckpt, photos / "photo.png", photos)
    (tmp_path / "link").symlink_to(photos)  # the same folder by another name
    with pytest.raises(ValueError, match=r"would overwrite the input image .*photo.png"):
        run_predict(ckpt, photos / "photo.png", tmp_path / "link")
    (tmp_path / "other").mkdir()  # the same file by another name
    (tmp_path / "other" / "photo.jpg").symlink_to(photos / "photo.png")
    with pytest.raises(ValueError, match=r"would overwrite the input image .*photo.jpg"):
        run_predict(ckpt, tmp_path / "other" / "photo.jpg", photos)
    assert digests(photos) == before


def test_outputs_next_to_the_input_are_not_read_as_inputs(ckpt, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "cat.jpg", 24, 16)
    written = run_predict(ckpt, photos / "cat.jpg", photos)  # allowed: cat.png is a new name
    assert written == [photos / "cat.png"]
    assert sorted(os.listdir(photos)) == ["cat.jpg", "cat.png", "cat_overlay.jpg", MANIFEST]
    # the folder as input: cat.png and cat_overlay.jpg are outputs, only cat.jpg is an input
    written = run_predict(ckpt, photos, tmp_path / "pred")
    assert written == [tmp_path / "pred" / "cat.png"]
    # a folder of nothing but predictions holds no inputs, and says why
    with pytest.raises(ValueError, match=r"holds no images .*2 are outputs of an earlier predict"):
        run_predict(ckpt, tmp_path / "pred", tmp_path / "pred2")


# --------------------------------------------------------------------------- one output per input
def test_inputs_with_one_stem_get_distinct_outputs(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = {"img.jpg": (20, 30), "img.png": (17, 13), "IMG.JPG": (9, 40), "other.png": (12, 12)}
    for name, (h, w) in sizes.items():
        save(photos / name, h, w)
    out = tmp_path / "pred"
    written = run_predict(ckpt, photos, out)
    printed = capsys.readouterr().out
    labels = {"IMG.JPG": "IMG.JPG.png", "img.jpg": "img.jpg-2.png", "img.png": "img.png.png"}
    labels["other.png"] = "other.png"
    assert sorted(p.name for p in written) == sorted(labels.values())
    for name, label in labels.items():
        h, w = sizes[name]
        assert label_size(out / label) == (w, h), name  # each input got its own label map
        assert (out / f"{label[:-4]}_overlay.jpg").is_file()
    assert "wrote 4 label maps and 4 overlays" in printed and str(out) in printed
    assert "img.jpg -> img.jpg-2.png" in printed and "other.png ->" not in printed
    manifest = json.loads((out / MANIFEST).read_text())["outputs"]
    assert manifest["img.png.png"] == str((photos / "img.png").resolve())
    assert len(manifest) == 8


@pytest.mark.parametrize(
    "names,heads,stems",
    [
        (["a.jpg", "b.png"], ["out"], ["a", "b"]),
        (["x.JPG", "x.jpeg", "y.png"], ["out"], ["x.JPG", "x.jpeg", "y"]),
        # the full-name stem of a clash taken by another input's own stem: numbered
        (["img.jpg", "img.jpg.png", "img.png"], ["out"], ["img.jpg-2", "img.jpg", "img.png"]),
        # two heads: a writes a_sem.png, a_sem writes a_sem_sem.png: no clash
        (["a.png", "a_sem.png"], ["sem", "geo"], ["a", "a_sem"]),
        (["a.png", "A.jpg"], ["sem", "geo"], ["a.png", "A.jpg"]),
        (["b.png", "b.jpg", "B.png", "B.jpg"], ["out"], ["b.png-2", "b.jpg-2", "B.png", "B.jpg"]),
    ],
)
def test_output_stems_are_unique_and_deterministic(names, heads, stems):
    files = [Path("/in") / n for n in names]
    assert [output_stems(files, heads)[f] for f in files] == stems
    assert output_stems(files[::-1], heads) == output_stems(files, heads)


# --------------------------------------------------------------------------- unrelated files
def test_unrelated_file_in_the_output_folder_is_refused(ckpt, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "a.jpg")
    save(photos / "b.jpg")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "b_overlay.jpg").write_bytes(b"my own picture")
    with pytest.raises(ValueError, match=r"already holds b_overlay.jpg, not written by predict"):
        run_predict(ckpt, photos, out)
    assert os.listdir(out) == ["b_overlay.jpg"]  # nothing written, not even a.png
    assert (out / "b_overlay.jpg").read_bytes() == b"my own picture"
    (out / "b_overlay.jpg").unlink()
    (out / MANIFEST).write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match=r"predictions.json exists and predict did not write it"):
        run_predict(ckpt, photos, out)
    assert os.listdir(out) == [MANIFEST]


def test_a_rerun_replaces_its_own_outputs_only(ckpt, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "a.jpg")
    out = tmp_path / "pred"
    run_predict(ckpt, photos, out)
    first = digests(out)
    (out / "a.png").write_bytes(b"stale")  # a run's own output may be replaced
    assert run_predict(ckpt, photos, out) == [out / "a.png"]
    assert digests(out) == first
    save(photos / "b.jpg")
    (out / "b.png").write_bytes(b"mine")  # this one is not a predict output
    with pytest.raises(ValueError, match=r"already holds b.png"):
        run_predict(ckpt, photos, out)
    assert (out / "b.png").read_bytes() == b"mine"


# --------------------------------------------------------------------------- unreadable images
def bad_images(folder: Path) -> list[str]:
    buf = folder / "full.jpg"
    save(buf, 64, 64)
    (folder / "truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    buf.unlink()
    (folder / "text.png").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return ["empty.png", "text.png", "truncated.jpg"]


def test_undecodable_images_are_skipped_and_reported(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "a.jpg", 21, 34)
    save(photos / "b.png", 30, 10)
    bad = bad_images(photos)
    out = tmp_path / "pred"
    with pytest.raises(DataError) as err:
        run_predict(ckpt, photos, out)
    message = str(err.value)
    assert "3 of 5 input images could not be read" in message
    assert all(str(photos / name) in message for name in bad)
    assert label_size(out / "a.png") == (34, 21) and label_size(out / "b.png") == (10, 30)
    assert "wrote 2 label maps and 2 overlays for 2 of 5 images" in capsys.readouterr().out
    assert sorted(json.loads((out / MANIFEST).read_text())["outputs"]) == [
        "a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg",
    ]  # fmt: skip
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    bad_images(only_bad)
    with pytest.raises(DataError, match="none of the 3 input images could be read"):
        run_predict(ckpt, only_bad, tmp_path / "pred2")
    assert "wrote 0 label maps" in capsys.readouterr().out


def test_folder_without_images_is_a_clear_error(ckpt, tmp_path):
    photos = tmp_path / "photos"
    (photos / "nested.png").mkdir(parents=True)  # a folder, and not listed recursively
    save(photos / "nested.png" / "deep.png")
    save(photos / ".hidden.png")
    (photos / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"input folder .*photos holds no images \(.*\.jpg"):
        run_predict(ckpt, photos, tmp_path / "pred")
    assert not (tmp_path / "pred").exists()


# --------------------------------------------------------------------------- every kind of image
def gray(h: int, w: int) -> np.ndarray:
    return gradient(h, w)[..., :2].mean(-1).round().astype(np.uint8)


def with_alpha(h: int, w: int) -> np.ndarray:
    alpha = np.linspace(0, 255, w).round().astype(np.uint8)[None, :, None].repeat(h, 0)
    return np.concatenate([gradient(h, w), alpha], -1)


def sixteen_bit(h: int, w: int) -> np.ndarray:
    return (np.linspace(0, 65535, w)[None, :].repeat(h, 0)).astype(np.uint16)


def pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# name: (file, size (h, w), writer, the RGB the overlay should show)
MODES = {
    "rgb jpeg": ("x.jpg", (20, 30), lambda a: Image.fromarray(a), pil_rgb),
    "gray jpeg": ("x.jpg", (20, 30), lambda a: Image.fromarray(a).convert("L"), pil_rgb),
    "cmyk jpeg": ("x.jpg", (20, 30), lambda a: Image.fromarray(a).convert("CMYK"), pil_rgb),
    "rgba png": ("x.png", (20, 30), None, lambda p: with_alpha(20, 30)[..., :3]),
    "la png": ("x.png", (20, 30), lambda a: Image.fromarray(a).convert("LA"), pil_rgb),
    "palette png": ("x.png", (20, 30), lambda a: Image.fromarray(a).quantize(64), pil_rgb),
    "16-bit png": ("x.png", (20, 30), None, lambda p: (sixteen_bit(20, 30) >> 8)[..., None]),
    "8x8": ("x.png", (8, 8), lambda a: Image.fromarray(a), pil_rgb),
    "1x1": ("x.png", (1, 1), lambda a: Image.fromarray(a), pil_rgb),
    "portrait": ("x.jpg", (50, 19), lambda a: Image.fromarray(a), pil_rgb),
    "landscape": ("x.webp", (19, 50), lambda a: Image.fromarray(a), pil_rgb),
    "tiff": ("x.tif", (20, 30), lambda a: Image.fromarray(a), pil_rgb),
    "gif": ("x.gif", (20, 30), lambda a: Image.fromarray(a).quantize(64), pil_rgb),
}


def test_files_that_are_not_images_are_named_not_silently_dropped(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "a.jpg")
    (photos / "IMG_0001.HEIC").write_bytes(b"not decodable here")
    (photos / "notes.txt").write_text("shot list")
    run_predict(ckpt, photos, tmp_path / "pred")
    assert "left out: 2 file(s): IMG_0001.HEIC, notes.txt" in capsys.readouterr().out


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_and_size_gives_a_label_at_its_size(ckpt, tmp_path, mode):
    name, (h, w), writer, expected = MODES[mode]
    photos = tmp_path / "photos"
    photos.mkdir()
    path = photos / name
    if mode == "rgba png":
        Image.fromarray(with_alpha(h, w), mode="RGBA").save(path)
    elif mode == "16-bit png":
        Image.fromarray(sixteen_bit(h, w)).save(path)
    else:
        writer(gradient(h, w)).save(path)
    out = tmp_path / "pred"
    assert run_predict(ckpt, path, out) == [out / "x.png"]
    with Image.open(out / "x.png") as label:
        assert label.mode == "P" and label.size == (w, h)
        classes = np.asarray(label)
        colours = np.asarray(label.convert("RGB"), dtype=np.float32)
        assert classes.max() < 5
    with Image.open(out / "x_overlay.jpg") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (w, h)
        shown = np.asarray(overlay, dtype=np.float32)
    # the overlay is the image's own RGB (alpha left aside) blended half and half with the label
    rgb = np.broadcast_to(expected(path), (h, w, 3)).astype(np.float32)
    assert np.abs(shown - (0.5 * rgb + 0.5 * colours)).mean() < 6, mode


def test_exif_rotated_photo_gets_a_label_as_displayed(ckpt, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored 30 wide x 20 high, shown turned 90 degrees
    Image.fromarray(gradient(20, 30)).save(tmp_path / "phone.jpg", exif=exif)
    run_predict(ckpt, tmp_path / "phone.jpg", tmp_path / "pred")
    assert label_size(tmp_path / "pred" / "phone.png") == (20, 30)
    with Image.open(tmp_path / "pred" / "phone_overlay.jpg") as overlay:
        assert overlay.size == (20, 30)


# --------------------------------------------------------------------------- command line
def test_cli_exits_non_zero_naming_unreadable_images(ckpt, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    save(photos / "good.jpg")
    (photos / "broken.png").write_text("not an image\n")
    out = tmp_path / "pred"
    # a process of its own, forked from helpers.launcher's server (train.py's imports done)
    (result,) = commands(
        [
            ROOT / "predict.py",
            f"ckpt_path={ckpt}",
            f"input={photos}",
            f"output={out}",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 2 input images could not be read" in result.stderr
    assert str(photos / "broken.png") in result.stderr
    assert f"wrote 1 label maps and 1 overlays for 1 of 2 images to {out}" in result.stdout
    assert (out / "good.png").is_file() and not (out / "broken.png").exists()


@pytest.mark.parametrize(
    ("error", "status", "printed"),
    [
        (ConfigError("input is not set"), 1, "Error: input is not set"),
        (DataError("1 of 2 input images could not be read"), 1, "Error: 1 of 2 input images"),
        (ExportError("differs from the checkpoint"), 1, "Error: differs from the checkpoint"),
        (PretrainedWeightsUnavailable("Could not download"), 1, "Error: Could not download"),
        (KeyboardInterrupt(), 130, "Interrupted"),
        (RunInterrupted("fcn16s was interrupted (Ctrl+C); continue with"), 130, "fcn16s was"),
        (RunInterrupted("fcn16s stopped by SIGTERM; continue with", 15), 143, "fcn16s stopped by"),
    ],
)
def test_only_the_command_turns_errors_into_an_exit_status(error, status, printed, capsys):
    def fails(cfg):
        raise error

    with pytest.raises(SystemExit) as stop:
        as_command(fails, None)
    assert stop.value.code == status
    assert capsys.readouterr().err.startswith(printed)


@pytest.mark.parametrize(
    ("command", "key"), [("eval", "ckpt_path"), ("predict", "input"), ("export", "ckpt_path")]
)
def test_a_required_setting_left_out_is_named_without_a_traceback(command, key, tmp_path, capsys):
    cfg = cfg_of(command, [], tmp_path)
    run_it = {"eval": evaluate, "predict": predict, "export": export}[command]
    with pytest.raises(SystemExit) as stop:
        as_command(run_it, cfg)
    assert stop.value.code == 1
    said = capsys.readouterr().err
    assert said.startswith(f"Error: {key} is not set: pass {key}=") and "Traceback" not in said


def test_a_bug_keeps_its_traceback():
    def buggy(cfg):
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        as_command(buggy, None)
    assert as_command(lambda cfg: cfg + 1, 1) == 2


# --------------------------------------------------------------------------- through predict_step
def noise(path: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def single_image_labels(ckpt: Path, path: Path) -> dict[str, np.ndarray]:
    """The module run directly on one image, as the loop before Lightning's did."""
    module = load_module(ckpt)
    x = eval_transforms(normalization=input_normalization(module))(
        tv_tensors.Image(read_image(path, exif_transpose=True))
    ).as_subclass(torch.Tensor)
    with torch.no_grad():
        return {k: v[0].argmax(0).numpy() for k, v in module(x[None]).items()}


def count_predict_steps(monkeypatch) -> list[tuple[int, ...]]:
    """The shape of the images of every batch FCNModule.predict_step is given."""
    shapes: list[tuple[int, ...]] = []
    step = FCNModule.predict_step

    def counted(self, batch, batch_idx, dataloader_idx=0):
        shapes.append(tuple(batch[0].shape))
        return step(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(FCNModule, "predict_step", counted)
    return shapes


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_of_one_size_predict_as_single_images(ckpt, tmp_path, monkeypatch, workers):
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = {"a.png": (20, 30), "b.png": (17, 13), "c.png": (20, 30)}
    for seed, (name, (h, w)) in enumerate(sizes.items()):
        noise(photos / name, h, w, seed)
    shapes = count_predict_steps(monkeypatch)
    out = tmp_path / "pred"
    overrides = [f"ckpt_path={ckpt}", f"input={photos}", f"output={out}", "device=cpu"]
    overrides += ["batch_size=2", f"num_workers={workers}"]
    written = predict(cfg_of("predict", overrides, tmp_path / "run"))
    assert written == [out / "a.png", out / "b.png", out / "c.png"]
    assert shapes == [(2, 3, 20, 30), (1, 3, 17, 13)]  # a and c together, b alone
    for name in sizes:
        expected = single_image_labels(ckpt, photos / name)["out"]
        with Image.open(out / name) as label:
            assert label.mode == "P" and np.array_equal(np.asarray(label), expected), name


def test_an_undecodable_image_leaves_its_batch(ckpt, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    noise(photos / "a.png", 20, 30, 0)
    data = noise(tmp_path / "b.png", 20, 30, 1).read_bytes()
    (photos / "b.png").write_bytes(data[: len(data) // 2])  # opens (20 x 30), fails to decode
    noise(photos / "c.png", 20, 30, 2)
    shapes = count_predict_steps(monkeypatch)
    out = tmp_path / "pred"
    overrides = [f"ckpt_path={ckpt}", f"input={photos}", f"output={out}", "device=cpu"]
    with pytest.raises(DataError, match=r"1 of 3 input images could not be read") as err:
        predict(cfg_of("predict", [*overrides, "batch_size=3"], tmp_path / "run"))
    assert "cannot decode image" in str(err.value) and str(photos / "b.png") in str(err.value)
    assert shapes == [(2, 3, 20, 30)]
    assert sorted(json.loads((out / MANIFEST).read_text())["outputs"]) == [
        "a.png", "a_overlay.jpg", "c.png", "c_overlay.jpg",
    ]  # fmt: skip
    for name in ("a.png", "c.png"):
        with Image.open(out / name) as label:
            assert np.array_equal(
                np.asarray(label), single_image_labels(ckpt, photos / name)["out"]
            )


def test_a_png_turned_by_metadata_past_its_pixels_is_predicted_as_shown(
    ckpt, tmp_path, monkeypatch
):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned: 20 wide x 30 high
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(gradient(20, 30)).save(photos / "turned.png", exif=exif)
    noise(photos / "plain.png", 30, 20, 0)
    data = (photos / "turned.png").read_bytes()  # move the eXIf chunk past the pixel data
    start = data.index(b"eXIf") - 4
    end = start + 12 + int.from_bytes(data[start : start + 4], "big")
    chunk, rest = data[start:end], data[:start] + data[end:]
    iend = rest.index(b"IEND") - 4
    (photos / "turned.png").write_bytes(rest[:iend] + chunk + rest[iend:])
    shapes = count_predict_steps(monkeypatch)
    out = tmp_path / "pred"
    overrides = [f"ckpt_path={ckpt}", f"input={photos}", f"output={out}", "device=cpu"]
    predict(cfg_of("predict", [*overrides, "batch_size=2"], tmp_path / "run"))
    # its header said 20 x 30: read again, at its true size, in a second pass
    assert shapes == [(1, 3, 30, 20), (0, 3, 30, 20), (1, 3, 30, 20)]
    for name in ("turned.png", "plain.png"):
        with Image.open(out / name) as label:
            assert np.array_equal(
                np.asarray(label), single_image_labels(ckpt, photos / name)["out"]
            )
