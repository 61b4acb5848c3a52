"""DataModules on tiny datasets in each official format, transforms, and bad input."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.io
import torch
from helpers import SHARED_DATA
from helpers.datasets import (
    VARIED_FOLDER,
    VARIED_VOC,
    make_label,
    one_head,
    save_palette_png,
    save_png16_rgb,
    save_varied_image,
    scene,
    write_binary_masks_folder,
    write_folder,
    write_sbd,
    write_varied_folder,
    write_varied_voc,
    write_voc,
)
from PIL import Image
from torchvision import tv_tensors

from fcn_lightning.data import (
    DataError,
    FolderDataModule,
    SyntheticDataModule,
    VOCDataModule,
    pad_collate,
    read_image,
    read_label_png,
    train_transforms,
)
from fcn_lightning.data.base import AUTO_WORKERS, loader_workers
from fcn_lightning.data.voc import load_sbd_label

PLAIN = {
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
}  # no normalisation: pixel values stay 0..1


def eval_dm(cls, root, **kw):
    return cls(
        root, batching="pad", crop_size=None, scale_range=None, hflip=False, num_workers=0, **kw
    )


# --------------------------------------------------------------------------- VOC + SBD
@pytest.fixture
def voc_root(tmp_path):
    write_voc(
        tmp_path,
        2011,
        {"train": ["2011_a", "2011_b"], "val": ["2011_c", "2011_d", "2011_e", "2011_f"]},
    )
    write_voc(tmp_path, 2012, {"train": ["2012_a"], "val": ["2012_b", "2012_c"]})
    write_sbd(tmp_path, {"train": ["2011_d", "2008_x", "2008_y"], "val": ["2008_z"]})
    return tmp_path


def test_voc_loads_with_shapes_dtypes_and_255(voc_root):
    dm = eval_dm(VOCDataModule, voc_root, year=2012, val_split="val")
    dm.setup("validate")
    ds = dm.datasets["val"]
    assert len(ds) == 2
    image, label = one_head(ds[0])
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert label.shape == (30, 40) and label.dtype == torch.int64
    values = set(label.unique().tolist())
    assert 255 in values and values <= set(range(21)) | {255}
    raw = np.asarray(Image.open(voc_root / "VOCdevkit/VOC2012/SegmentationClass/2012_b.png"))
    assert torch.equal(label, torch.from_numpy(raw.astype(np.int64)))
    assert dm.contract.num_classes == {"out": 21} and dm.class_names[15] == "person"


def test_sbd_mat_labels_load(voc_root):
    dm = eval_dm(VOCDataModule, voc_root, year=2011, train_split="sbd_train", val_split="sbd_val")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1
    mat = scipy.io.loadmat(voc_root / "benchmark_RELEASE/dataset/cls/2008_z.mat")
    expected = mat["GTcls"][0]["Segmentation"][0]
    assert expected.dtype == np.uint8
    _, label = one_head(dm.datasets["val"][0])
    assert torch.equal(label, torch.from_numpy(expected.astype(np.int64)))


def test_seg11valid_is_voc2011_val_minus_sbd_train(voc_root):
    dm = VOCDataModule(voc_root, year=2011)
    assert [i for _, i in dm.split_ids("seg11valid")] == ["2011_c", "2011_e", "2011_f"]
    dm2012 = VOCDataModule(voc_root, year=2012)
    with pytest.raises(ValueError, match="data.year=2011"):
        dm2012.split_ids("seg11valid")


def test_sbd_train_plus_voc_train_without_duplicates(voc_root):
    dm = VOCDataModule(voc_root, year=2011)
    ids = dm.split_ids("sbd_train+voc_train")
    assert [i for _, i in ids] == ["2011_d", "2008_x", "2008_y", "2011_a", "2011_b"]
    dm = eval_dm(VOCDataModule, voc_root, year=2011, train_split="sbd_train+voc_train")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 5


@pytest.mark.skipif(
    not (SHARED_DATA / "voc_mini").is_dir(), reason="../shared/data/voc_mini not present"
)
def test_real_voc_mini_files():
    dm = VOCDataModule(
        SHARED_DATA / "voc_mini",
        year=2012,
        batch_size=2,
        batching="crop",
        crop_size=96,
        scale_range=(0.5, 2.0),
        hflip=True,
        val_batch_size=2,
        num_workers=0,
    )
    dm.setup("fit")
    sizes = set()
    for image, label in (dm.datasets["val"].load(i)[:2] for i in dm.datasets["val"].ids):
        sizes.add(tuple(image.shape[-2:]))
        label = np.asarray(label["out"])
        assert (label == 255).any()  # the void border
        assert set(np.unique(label).tolist()) <= set(range(21)) | {255}
    assert sizes <= {(375, 500), (338, 500)}
    images, labels = one_head(
        next(iter(dm.val_dataloader()))
    )  # whole images, padded to the larger one
    assert images.shape[0] == 2 and labels.shape == images.shape[:1] + images.shape[2:]
    images, labels = one_head(next(iter(dm.train_dataloader())))
    assert images.shape == (2, 3, 96, 96) and labels.shape == (2, 96, 96)
    # the label check on real files, whose folder is read-only: the cache lives elsewhere
    dm = VOCDataModule(SHARED_DATA / "voc_mini", year=2012, train_split="train", val_split="val")
    report = dm.check_labels()
    assert set(report.splits) == {"train", "val"} and report.splits["val"].images == 2
    assert 0.02 < report.splits["val"].ignored_share < 0.3  # the void borders
    assert (
        report.splits["train"].histogram[0] > 0 and "background" not in report.splits["val"].absent
    )


# --------------------------------------------------------------------------- transforms
def _pattern(h=64, w=80):
    """An asymmetric block pattern: label k where the image's red channel is 40*k."""
    label = np.zeros((h, w), np.uint8)
    label[:, : w // 4] = 1
    label[h // 2 :, w // 2 :] = 2
    label[4:20, 30:70] = 3
    label[0, :] = 255
    image = np.zeros((3, h, w), np.uint8)
    image[0] = np.where(label == 255, 0, label * 40)
    image[1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # left-right ramp, shows a flip
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(
        torch.from_numpy(label.astype(np.int64))
    )


@pytest.mark.parametrize("seed", range(6))
def test_image_and_label_stay_aligned_through_scale_crop_flip(seed):
    torch.manual_seed(seed)
    image, label = _pattern()
    t = train_transforms(crop_size=48, scale_range=(0.5, 2.0), hflip=True, normalization=PLAIN)
    out_image, out_label = t(image, label)
    assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48)
    assert out_image.dtype == torch.float32
    valid = out_label != 255
    # padded area: image 0, label 255
    from_red = (out_image[0] * 255 / 40).round().long()
    agree = (from_red[valid] == out_label[valid]).float().mean()
    assert agree > 0.9, agree  # only resampled block edges may disagree
    assert set(out_label.unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest: no blended labels


def test_flip_moves_image_and_label_together():
    image, label = _pattern()
    t = train_transforms(crop_size=None, scale_range=None, hflip=True, normalization=PLAIN)
    flipped = False
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_label = t(image, label)
        flipped |= bool(out_label[10, 0] == 0)  # class 1 sits at the left unless flipped
        valid = out_label != 255
        assert ((out_image[0] * 255 / 40).round().long()[valid] == out_label[valid]).all()
    assert flipped


def test_crop_pads_image_with_zero_and_label_with_255():
    image, label = _pattern(20, 20)
    t = train_transforms(crop_size=40, scale_range=None, hflip=False, normalization=PLAIN)
    out_image, out_label = t(image, label)
    assert out_label.shape == (40, 40)
    pad = torch.ones(40, 40, dtype=torch.bool)
    pad[:20, :20] = False
    pad_mask = out_label == 255
    assert pad_mask.sum() >= 40 * 40 - 400
    assert (out_image[:, ~(out_label != 255) & (out_image[1] == 0)] == 0).all()


def test_caffe_normalization_is_bgr_minus_mean():
    image = tv_tensors.Image(
        torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).clone()
    )
    out, _ = train_transforms(crop_size=None, scale_range=None, hflip=False, normalization="caffe")(
        image, tv_tensors.Mask(torch.zeros(2, 2, dtype=torch.long))
    )
    torch.testing.assert_close(
        out[:, 0, 0], torch.tensor([30 - 104.00699, 20 - 116.66877, 10 - 122.67891])
    )


def test_pad_collate_pads_labels_with_ignore():
    a = (torch.ones(3, 4, 5), {"out": torch.zeros(4, 5, dtype=torch.long)})
    b = (torch.ones(3, 6, 3), {"out": torch.ones(6, 3, dtype=torch.long)})
    images, labels = one_head(pad_collate([a, b]))
    assert images.shape == (2, 3, 6, 5) and labels.shape == (2, 6, 5)
    assert (
        (labels[0, 4:] == 255).all()
        and (labels[1, :, 3:] == 255).all()
        and (images[0, :, 4:] == 0).all()
    )


# --------------------------------------------------------------------------- folder + synthetic
def test_folder_with_classes_txt_and_index_pngs(tmp_path):
    write_folder(
        tmp_path,
        ["a", "b", "c"],
        ["bg", "cat", "dog"],
        splits={"train": ["a", "b"], "val": ["c"]},
        palette=False,
        ext=".png",
    )
    dm = eval_dm(FolderDataModule, tmp_path)
    dm.setup("fit")
    assert dm.class_names == ("bg", "cat", "dog") and len(dm.datasets["train"]) == 2
    image, label = one_head(dm.datasets["val"][0])
    assert image.shape == (3, 24, 32) and 255 in label.unique().tolist()


def test_folder_without_lists_uses_every_image(tmp_path):
    write_folder(tmp_path, ["a", "b", "c"], None)
    dm = eval_dm(FolderDataModule, tmp_path, num_classes=3)
    with pytest.warns(UserWarning, match="uses all 3 labelled images"):
        dm.setup("validate")
    assert len(dm.datasets["val"]) == 3 and dm.class_names == ("class_0", "class_1", "class_2")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        dm.setup("fit"), dm.label_files("train"), dm.label_files("val")
    told = [str(w.message) for w in said if "uses all" in str(w.message)]
    assert len(told) == 1 and "split 'train'" in told[0]  # each split's warning said once


def test_synthetic_is_deterministic_and_has_fine_structure():
    dm = eval_dm(SyntheticDataModule, None, train_size=4, val_size=4, image_size=64)
    dm.setup("fit")
    a, b = dm.datasets["train"][2], dm.datasets["train"][2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["out"], b[1]["out"])
    assert not torch.equal(dm.datasets["train"][0][1]["out"], dm.datasets["val"][0][1]["out"])
    counts = torch.zeros(5)
    for i in range(4):
        counts += torch.bincount(dm.datasets["train"][i][1]["out"].flatten(), minlength=5)
    assert (counts[1:4] > 0).all()
    assert counts[3] < counts[1]  # dots are small


def test_synthetic_written_to_disk_reads_back_identically(tmp_path):
    syn = eval_dm(SyntheticDataModule, None, train_size=3, val_size=2, image_size=48)
    syn.write_voc(tmp_path)
    folder = eval_dm(FolderDataModule, tmp_path)
    syn.setup("fit")
    folder.setup("fit")
    assert folder.class_names == syn.class_names
    for split in ("train", "val"):
        assert len(folder.datasets[split]) == len(syn.datasets[split])
        for i in range(len(syn.datasets[split])):
            (x1, y1), (x2, y2) = syn.datasets[split][i], folder.datasets[split][i]
            assert torch.equal(x1, x2) and torch.equal(y1["out"], y2["out"])


def test_loader_workers_pickle_the_dataset():
    dm = SyntheticDataModule(train_size=4, val_size=2, image_size=32, batch_size=2, num_workers=2)
    images, labels = one_head(next(iter(dm.train_dataloader())))
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32)


# --------------------------------------------------------------------------- bad input
def _voc(tmp_path):
    return write_voc(tmp_path, 2012, {"train": ["x1", "x2"], "val": ["y1"]})


def _missing_root(tmp_path):
    return VOCDataModule(tmp_path / "nowhere", year=2012), "fit"


def _missing_image(tmp_path):
    (_voc(tmp_path) / "VOCdevkit/VOC2012/JPEGImages/x2.jpg").unlink()
    return VOCDataModule(tmp_path, year=2012), "fit"


def _missing_label(tmp_path):
    (_voc(tmp_path) / "VOCdevkit/VOC2012/SegmentationClass/y1.png").unlink()
    return VOCDataModule(tmp_path, year=2012), "validate"


def _corrupt_image(tmp_path):
    (_voc(tmp_path) / "VOCdevkit/VOC2012/JPEGImages/y1.jpg").write_bytes(
        b"\xff\xd8 not really a jpeg"
    )
    return VOCDataModule(tmp_path, year=2012), "validate"


def _size_mismatch(tmp_path):
    save_palette_png(
        np.zeros((10, 10), np.uint8), _voc(tmp_path) / "VOCdevkit/VOC2012/SegmentationClass/y1.png"
    )
    return VOCDataModule(tmp_path, year=2012), "validate"


def _label_out_of_range(tmp_path):
    label = make_label(30, 40, 21, np.random.default_rng(0))
    label[5, 5] = 42
    save_palette_png(label, _voc(tmp_path) / "VOCdevkit/VOC2012/SegmentationClass/y1.png")
    return VOCDataModule(tmp_path, year=2012), "validate"


def _empty_split(tmp_path):
    (_voc(tmp_path) / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("\n")
    return VOCDataModule(tmp_path, year=2012), "validate"


def _missing_split_list(tmp_path):
    _voc(tmp_path)
    return VOCDataModule(tmp_path, year=2012, val_split="trainval"), "validate"


def _class_count_disagrees(tmp_path):
    write_folder(tmp_path, ["a"], ["bg", "cat", "dog"])
    return FolderDataModule(tmp_path, num_classes=4), "validate"


def _labels_beyond_class_count(tmp_path):
    write_folder(tmp_path, ["a"], ["bg", "cat", "dog", "cow", "pig"], seed=3)
    (tmp_path / "classes.txt").write_text("bg\n")
    return FolderDataModule(tmp_path), "validate"


def _unknown_class_count(tmp_path):
    write_folder(tmp_path, ["a"], None)
    return FolderDataModule(tmp_path), "validate"


def _rgb_label(tmp_path):
    write_folder(tmp_path, ["a"], ["bg", "fg"])
    Image.new("RGB", (32, 24)).save(tmp_path / "SegmentationClass" / "a.png")
    return FolderDataModule(tmp_path), "validate"


def _folder_missing_subdir(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    return FolderDataModule(tmp_path, num_classes=2), "validate"


def _folder_root_mistyped(tmp_path):  # no classes.txt to read there either: the root is named
    return FolderDataModule(tmp_path / "mien"), "validate"


def _sbd_mat_without_gtcls(tmp_path):
    write_sbd(tmp_path, {"val": ["s1"]})
    scipy.io.savemat(tmp_path / "benchmark_RELEASE/dataset/cls/s1.mat", {"other": np.zeros(2)})
    return VOCDataModule(tmp_path, year=2012, val_split="sbd_val"), "validate"


def _sbd_missing(tmp_path):
    _voc(tmp_path)
    return VOCDataModule(tmp_path, year=2012, train_split="sbd_train"), "fit"


BAD_INPUT = [
    (
        _missing_root,
        r"data.root .*nowhere does not exist[\s\S]*VOCdevkit/VOC2012/JPEGImages[\s\S]*thor.robots.ox.ac.uk",
    ),
    (_missing_image, r"split 'train' lists 'x2' but .*JPEGImages/x2.jpg does not exist"),
    (_missing_label, r"split 'val' lists 'y1' but .*SegmentationClass/y1.png does not exist"),
    (_corrupt_image, r"cannot decode image .*y1.jpg"),
    (_size_mismatch, r"y1.png: label is \(10, 10\) \(H, W\) but its image is \(30, 40\)"),
    (_label_out_of_range, r"label .*y1.png has values \[42\] outside 0..20 and 255"),
    (_empty_split, r"split list .*val.txt is empty"),
    (_missing_split_list, r"split list not found: .*trainval.txt"),
    (_class_count_disagrees, r"data.num_classes=4 disagrees with the 3 classes in .*classes.txt"),
    (
        _labels_beyond_class_count,
        r"label .*a.png has values \[.*\] outside 0..0 and 255 \(num_classes=1",
    ),
    (_unknown_class_count, r"set data.num_classes or write .*classes.txt"),
    (_rgb_label, r"label .*a.png is a RGB image; labels must be palette"),
    (_folder_missing_subdir, r"SegmentationClass not found[\s\S]*Expected layout"),
    (_folder_root_mistyped, r"data.root .*mien does not exist[\s\S]*Expected layout"),
    (_sbd_mat_without_gtcls, r"s1.mat has no 'GTcls' key \(found \['other'\]\)"),
    (_sbd_missing, r"SBD \(benchmark_RELEASE/dataset\) not found[\s\S]*benchmark.tgz"),
]


@pytest.mark.parametrize("make,match", BAD_INPUT, ids=[f.__name__.strip("_") for f, _ in BAD_INPUT])
def test_bad_input_gives_clear_error(tmp_path, make, match):
    dm, stage = make(tmp_path)
    with pytest.raises(DataError, match=match):
        dm.setup(stage)
        key = {"fit": "train", "validate": "val"}[stage]
        for i in range(len(dm.datasets[key])):  # per-sample checks run when a sample is read
            dm.datasets[key][i]


def test_bad_batching_settings():
    with pytest.raises(ValueError, match="data.batch_size=1"):
        SyntheticDataModule(batching="whole", batch_size=4)
    with pytest.raises(ValueError, match="data.batching must be one of"):
        SyntheticDataModule(batching="tiles")
    with pytest.raises(ValueError, match="unknown VOC split 'test'"):
        VOCDataModule("/x", val_split="test")


def test_sbd_label_reader_matches_official_access_path(tmp_path):
    write_sbd(tmp_path, {"train": ["s"]})
    label = load_sbd_label(tmp_path / "benchmark_RELEASE/dataset/cls/s.mat")
    assert label.dtype == np.uint8 and label.shape == (30, 40)


# --------------------------------------------------------------------------- real-world image files
@pytest.mark.parametrize(
    "dtype,suffix", [(np.uint16, ".png"), (">u2", ".tif"), (np.int32, ".tif")], ids=str
)
def test_16bit_grey_image_keeps_its_grey_levels(tmp_path, dtype, suffix):
    """16-bit greyscale scales by 65535 -> 255 (Image.convert clips it to white); a 12-bit image
    stored in 16 bits (max 4095) comes out dark but faithful."""
    values = np.array([[0, 4095, 257 * 50, 257 * 128], [30000, 50000, 65000, 65535]])
    path = tmp_path / f"grey{suffix}"
    Image.fromarray(values.astype(dtype)).save(path)
    image = read_image(path)
    expected = np.rint(values * 255 / 65535).astype(np.uint8)
    assert image.shape == (3, 2, 4) and image.dtype == torch.uint8
    for channel in image:
        np.testing.assert_array_equal(channel.numpy(), expected)
    assert image[0, 0, 1] == 16 and image[0, 0, 2] == 50  # 12-bit white: dark, not white
    assert read_image(path, mode="L").shape == (1, 2, 4)


def test_float_image_in_0_to_1_scales_to_255(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif")[0, 0].tolist() == [0, 128, 255]


def test_every_common_mode_decodes_to_its_colours(tmp_path):
    rgb = scene(make_label(30, 40, 4, np.random.default_rng(0)), np.random.default_rng(1))
    grey = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float32)
    tolerance = {"jpeg": 6.0, "palette": 4.0}  # mean absolute error; exact otherwise
    for kind in [kind for _, kind, _ in VARIED_FOLDER]:
        image = read_image(save_varied_image(rgb, tmp_path / kind, kind))
        assert image.shape == (3, 30, 40) and image.dtype == torch.uint8, kind
        got = image.permute(1, 2, 0).numpy().astype(np.float32)
        expected = rgb.astype(np.float32)
        if kind in ("gray_jpeg", "la_png", "gray16_png", "bilevel_png"):  # greyscale sources
            assert (got == got[..., :1]).all(), kind
            expected = np.repeat(grey[..., None], 3, axis=2)
            if kind == "bilevel_png":
                expected = np.where(expected >= 128, 255.0, 0.0)
        error = np.abs(got - expected).mean()
        assert error <= next((t for k, t in tolerance.items() if k in kind), 0.0), (kind, error)
    rgb16 = np.zeros((3, 5, 3), np.uint16)  # Pillow opens 16-bit RGB PNGs as 8-bit RGB
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 257 * 128, 257 * 3
    image = read_image(save_png16_rgb(rgb16, tmp_path / "rgb16.png"))
    assert image.shape == (3, 3, 5) and image[:, 1, 2].tolist() == [255, 128, 3]


def test_exif_orientation_is_applied_only_when_asked(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(tmp_path / "phone.jpg").shape == (3, 30, 40)  # the stored pixels: training
    assert read_image(tmp_path / "phone.jpg", exif_transpose=True).shape == (3, 40, 30)


@pytest.mark.parametrize("kind", ["rgb_jpeg", "gray16_png"])
def test_truncated_image_names_itself(tmp_path, kind):
    rgb = scene(make_label(40, 48, 4, np.random.default_rng(0)), np.random.default_rng(1))
    path = save_varied_image(rgb, tmp_path / "cut", kind)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"cannot decode image .*{path.name}"):
        read_image(path, exif_transpose=True)


def test_16bit_label_above_255_is_refused_not_wrapped(tmp_path):
    label = np.zeros((6, 8), np.uint16)
    label[1, 1], label[2, 2] = 300, 255
    Image.fromarray(label).save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"label .*big.png is a I;16 image with values \[300\]"):
        read_label_png(tmp_path / "big.png")
    label[1, 1] = 7  # 0..255 in a 16-bit file: fine, as uint8
    Image.fromarray(label).save(tmp_path / "ok.png")
    out = read_label_png(tmp_path / "ok.png")
    assert out.dtype == np.uint8 and out[1, 1] == 7 and out[2, 2] == 255


def test_1bit_and_16bit_big_endian_labels_are_indices(tmp_path):
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    Image.fromarray(mask).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "bits.png"), mask.astype(np.uint8))
    Image.fromarray((mask * 300).astype(">u2")).save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big.tif is a I;16B image with values \[300\]"):
        read_label_png(tmp_path / "big.tif")


def test_rgb_label_refusal_says_how_to_convert(tmp_path):
    grey = np.zeros((4, 4, 3), np.uint8)
    grey[1:3, 1:3] = 2
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with pytest.raises(DataError, match=r"must be palette .*convert\('L'\)"):
        read_label_png(tmp_path / "grey.png")
    grey[0, 0] = (128, 0, 0)
    Image.fromarray(grey).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"colour.png is a RGB image.*To convert a colour-coded"):
        read_label_png(tmp_path / "colour.png")


def test_varied_voc_loads_every_format_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_LIGHTNING_CACHE", str(tmp_path / "cache"))
    write_varied_voc(tmp_path)
    dm = eval_dm(VOCDataModule, tmp_path, year=2012, val_batch_size=4)
    dm.setup("fit")
    sizes = {size for _, _, size in VARIED_VOC}
    seen = set()
    for key in ("train", "val"):
        for k in range(len(dm.datasets[key])):
            image, label = one_head(dm.datasets[key][k])
            assert image.shape[0] == 3 and image.shape[1:] == label.shape
            assert set(label.unique().tolist()) <= set(range(21)) | {255}
            seen.add(tuple(label.shape))
    assert seen == sizes
    images, labels = one_head(
        next(iter(dm.val_dataloader()))
    )  # widths differ: padded to the largest
    assert images.shape == (4, 3, 48, 48) and (labels == 255).any()
    # the label check reads the palette and 'L' labels as training does
    labels = [dm.datasets["val"][k][1]["out"] for k in range(len(dm.datasets["val"]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from so small a split
        report = dm.check_labels(["val"])
    counts = sum(torch.bincount(lab[lab != 255], minlength=21) for lab in labels)
    assert report.splits["val"].histogram.tolist() == counts.tolist()


def test_varied_folder_decodes_16bit_and_alpha_images(tmp_path):
    write_varied_folder(tmp_path)
    dm = eval_dm(FolderDataModule, tmp_path, normalization=PLAIN)
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == len(VARIED_FOLDER)
    for key in ("train", "val"):
        for k in range(len(dm.datasets[key])):
            image, label = one_head(dm.datasets[key][k])
            assert image.shape[1:] == label.shape and image.mean() < 0.8  # not saturated
    stored = np.asarray(Image.open(tmp_path / "JPEGImages/gray16.png")) / 65535
    image, _ = dm.datasets["val"][dm.datasets["val"].ids.index("gray16")]
    np.testing.assert_allclose(image[0].numpy(), stored, atol=0.5 / 255)


def test_label_map_makes_0_255_masks_train_ready(tmp_path):
    write_binary_masks_folder(tmp_path)
    plain = eval_dm(FolderDataModule, tmp_path)
    plain.setup("validate")
    assert set(plain.datasets["val"][0][1]["out"].unique().tolist()) == {0, 255}  # objects ignored
    mapped = eval_dm(FolderDataModule, tmp_path, label_map={255: 1})
    mapped.setup("validate")
    for k in range(len(mapped.datasets["val"])):
        assert set(mapped.datasets["val"][k][1]["out"].unique().tolist()) == {0, 1}
    bad = eval_dm(FolderDataModule, tmp_path, label_map={255: 7})  # mapped out of range
    bad.setup("validate")
    with pytest.raises(DataError, match=r"label .*img_004.png has values \[7\] outside 0..1"):
        bad.datasets["val"][0]


def test_num_workers_auto_uses_no_more_loader_processes_than_cores():
    cores = len(os.sched_getaffinity(0))
    assert loader_workers("auto") == min(AUTO_WORKERS, cores)
    assert loader_workers(3) == 3 and loader_workers("0") == 0
    for bad in (-1, "many", True):
        with pytest.raises(ValueError, match="data.num_workers must be auto or a count"):
            loader_workers(bad)
    assert SyntheticDataModule(num_workers="auto").num_workers == min(AUTO_WORKERS, cores)
