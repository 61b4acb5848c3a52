"""The label check run before training: counts, warnings, errors, the cache, every DataModule."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import scipy.io
import torch
from helpers.datasets import (
    SIFT_SUBDIR,
    make_label,
    save_palette_png,
    write_binary_masks_folder,
    write_folder,
    write_nyud,
    write_sbd,
    write_siftflow,
    write_varied_folder,
    write_varied_voc,
    write_voc,
)

from fcn_lightning.data import (
    DataError,
    FolderDataModule,
    LabelReport,
    NYUDDataModule,
    SiftFlowDataModule,
    SyntheticDataModule,
    VOCDataModule,
    labelcheck,
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test caches under its own folder, never under the home folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FCN_LIGHTNING_CACHE", str(folder))
    return folder


def quiet_check(dm, *args, **kwargs) -> LabelReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dm.check_labels(*args, **kwargs)


def raw_counts(labels: list[np.ndarray], n: int) -> np.ndarray:
    return sum(np.bincount(lab[lab != 255].ravel(), minlength=n) for lab in labels)


# --------------------------------------------------------------------------- what it finds
def test_counts_equal_the_label_files(tmp_path):
    root = write_voc(tmp_path / "d", 2012, {"train": ["a", "b", "c"], "val": ["d", "e"]})
    report = VOCDataModule(root, year=2012).check_labels()
    assert list(report.splits) == ["train", "val"] and not report.from_cache
    folder = root / "VOCdevkit/VOC2012/SegmentationClass"
    for split, ids in {"train": "abc", "val": "de"}.items():
        labels = [np.asarray(PIL.Image.open(folder / f"{i}.png")) for i in ids]
        s = report.splits[split]
        assert s.images == len(ids) and s.pixels == sum(lab.size for lab in labels)
        np.testing.assert_array_equal(s.histogram, raw_counts(labels, 21))
        assert s.ignored == sum(int((lab == 255).sum()) for lab in labels)
        assert set(s.absent) == {
            n for n, c in zip(s.class_names, s.histogram, strict=True) if not c
        }
    text = report.format()
    assert len(text.splitlines()) <= 2 + 2 + len(report.warnings)
    assert "train: 3 images" in text and "% ignored" in text and "classes absent" in text


def test_binary_0_255_masks_warn_and_label_map_fixes_them(tmp_path):
    root = write_binary_masks_folder(tmp_path / "masks")
    with pytest.warns(UserWarning, match=r"masks saved as 0/255\? set data.label_map=\{255: 1\}"):
        report = FolderDataModule(root).check_labels()
    assert any("data.label_map={255: 1}" in w for w in report.warnings)
    assert "data.label_map={255: 1}" in report.format()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning once mapped
        mapped = FolderDataModule(root, label_map={255: 1}).check_labels()
    for s in mapped.splits.values():
        assert s.histogram[1] > 0 and s.ignored == 0 and not s.absent
    assert not mapped.warnings


def test_out_of_range_value_in_val_split_is_found_before_training(tmp_path):
    root = write_voc(tmp_path / "d", 2012, {"train": ["a", "b"], "val": ["y1", "y2"]})
    label = make_label(30, 40, 21, np.random.default_rng(0))
    label[5, 5] = 42
    save_palette_png(label, root / "VOCdevkit/VOC2012/SegmentationClass/y2.png")
    dm = VOCDataModule(root, year=2012)
    dm.setup("fit")  # what the pipeline runs first: lists and files exist, nothing is decoded
    with pytest.raises(DataError) as err:
        dm.check_labels()
    message = str(err.value)
    assert "split 'val'" in message and "y2.png: [42]" in message and "y1.png" not in message
    assert "data.num_classes" in message and "data.label_map={42: 255}" in message
    # the label map is applied before the range check, in the check as in training
    report = quiet_check(VOCDataModule(root, year=2012, label_map={42: 255}))
    assert report.splits["val"].images == 2
    with pytest.raises(DataError, match=r"outside 0..20"):  # a mapped value out of range
        quiet_check(VOCDataModule(root, year=2012, label_map={42: 21}), ["val"])


def test_unreadable_and_16bit_labels_are_named(tmp_path):
    root = write_folder(
        tmp_path / "d", ["a", "b", "c"], ["bg", "x", "y"], {"train": ["a", "b", "c"]}
    )
    (root / "SegmentationClass/b.png").write_bytes(b"not a png")
    wide = np.zeros((24, 32), np.uint16)
    wide[0, 0] = 300
    PIL.Image.fromarray(wide).save(root / "SegmentationClass/c.png")
    with pytest.raises(DataError) as err:
        quiet_check(FolderDataModule(root), ["train"])
    assert "cannot read label" in str(err.value) and "b.png" in str(err.value)
    assert "c.png is a I;16 image with values [300]" in str(err.value)


def test_warns_about_ignored_share_and_classes_absent_from_training(tmp_path):
    root = write_folder(tmp_path / "d", ["a", "b"], ["bg", "cat", "dog", "cow"], {"train": ["a"]})
    label = np.full((24, 32), 255, np.uint8)
    label[:4] = 0
    label[4:8] = 1
    save_palette_png(label, root / "SegmentationClass/a.png")
    with pytest.warns(UserWarning) as record:
        report = FolderDataModule(root, val_split="train").check_labels()
    messages = " ".join(str(w.message) for w in record)
    assert "67% of the pixels of split 'train' are ignored" in messages
    assert "classes never in the training split 'train': dog, cow" in messages
    assert report.splits["train"].absent == ["dog", "cow"]


def test_the_check_leaves_the_global_random_state_alone(tmp_path):
    root = write_voc(tmp_path / "d", 2012, {"train": ["a", "b", "c"], "val": ["d"]})
    for workers in (0, 2):  # training draws its initial weights from that state after the check
        torch.manual_seed(0)
        expected = torch.rand(4)
        torch.manual_seed(0)
        quiet_check(VOCDataModule(root, year=2012, num_workers=workers))
        assert torch.equal(torch.rand(4), expected)


def test_eval_checks_only_its_split(tmp_path):
    root = write_voc(tmp_path / "d", 2012, {"train": ["a"], "val": ["b", "c"]})
    report = quiet_check(VOCDataModule(root, year=2012), ["val"])
    assert list(report.splits) == ["val"] and report.splits["val"].images == 2


# --------------------------------------------------------------------------- the cache
def test_second_check_reads_no_label_file_and_a_changed_file_is_reread(
    tmp_path, cache, monkeypatch
):
    root = write_voc(tmp_path / "d", 2012, {"train": ["a", "b", "c"], "val": ["d"]})
    dm = VOCDataModule(root, year=2012)
    first = quiet_check(dm)
    assert not first.from_cache and first.splits["train"].cached == 0
    assert list(cache.glob("labels-*.json")) and not list(root.rglob("*.json"))

    def no_reading(*args, **kwargs):
        raise AssertionError("a label file was opened")

    with monkeypatch.context() as m:  # nothing may be decoded: not here, not in a worker
        m.setattr(PIL.Image, "open", no_reading)
        m.setattr(scipy.io, "loadmat", no_reading)
        second = quiet_check(dm)
    assert second.from_cache and "from the cache" in second.format()
    for key, s in first.splits.items():
        np.testing.assert_array_equal(second.splits[key].histogram, s.histogram)

    path = root / "VOCdevkit/VOC2012/SegmentationClass/b.png"
    save_palette_png(np.full((30, 40), 3, np.uint8), path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    third = quiet_check(dm)
    assert not third.from_cache and third.splits["train"].cached == 2
    assert third.splits["val"].from_cache
    assert third.splits["train"].histogram[3] >= 30 * 40


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, cache):
    root = write_voc(tmp_path / "d", 2012, {"train": ["a", "b"], "val": ["c"]})
    dm = VOCDataModule(root, year=2012)
    first = quiet_check(dm)
    (cache_file,) = cache.glob("labels-*.json")
    for garbage in ('{"version": 1, "entries": {"x": 3', "[1, 2]", "\x00\xff"):
        cache_file.write_text(garbage)
        report = quiet_check(dm)
        assert not report.from_cache
        np.testing.assert_array_equal(
            report.splits["train"].histogram, first.splits["train"].histogram
        )
        assert json.loads(cache_file.read_text())["version"] == labelcheck.CACHE_VERSION
    assert quiet_check(dm).from_cache


def test_an_edit_keeping_size_and_mtime_is_not_served_from_the_cache(tmp_path):
    root = write_folder(tmp_path / "d", ["a", "b"], ["bg", "x", "y"], {"train": ["a", "b"]})
    path = root / "SegmentationClass/a.png"

    def save_raw(value: int) -> None:  # uncompressed: the file's size depends on the shape only
        img = PIL.Image.fromarray(np.full((24, 32), value, np.uint8), mode="P")
        img.putpalette([0, 0, 0] * 256)
        img.save(path, compress_level=0)

    save_raw(1)
    dm = FolderDataModule(root, val_split="train")
    first = quiet_check(dm)
    before = path.stat()
    save_raw(2)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -r` or a restore
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = quiet_check(dm)
    assert not second.from_cache and second.splits["train"].cached == 1
    assert first.splits["train"].histogram[1] - second.splits["train"].histogram[1] == 24 * 32
    assert second.splits["train"].histogram[2] - first.splits["train"].histogram[2] == 24 * 32


def save_raw_label(path, value: int, bad_pixel: int | None = None) -> None:
    """An uncompressed palette PNG: its size depends on the shape only, never on the values."""
    label = np.full((24, 32), value, np.uint8)
    if bad_pixel is not None:
        label[3, 4] = bad_pixel
    img = PIL.Image.fromarray(label, mode="P")
    img.putpalette([0, 0, 0] * 256)
    img.save(path, compress_level=0)


def test_a_bad_value_written_keeping_size_and_mtime_fails_the_next_check(tmp_path, cache):
    root = write_folder(tmp_path / "d", ["a", "b"], ["bg", "x", "y"], {"train": ["a", "b"]})
    path = root / "SegmentationClass/a.png"
    save_raw_label(path, 1)
    dm = FolderDataModule(root, val_split="train")
    quiet_check(dm)
    assert quiet_check(dm).from_cache and list(cache.glob("labels-*.json"))
    before = path.stat()
    save_raw_label(path, 1, bad_pixel=40)  # then `touch -r`, or a restore keeping the mtime
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(DataError) as err:
        quiet_check(dm)
    assert f"{path}: [40]" in str(err.value) and "outside 0..2" in str(err.value)


def test_a_bad_value_met_at_load_time_names_the_file_and_the_value(tmp_path):
    root = write_folder(tmp_path / "d", ["a", "b"], ["bg", "x", "y"], {"train": ["a", "b"]})
    dm = FolderDataModule(root, val_split="train")
    dm.setup("fit")
    quiet_check(dm)  # passed; the file is changed after the check, read by training
    path = root / "SegmentationClass/b.png"
    save_raw_label(path, 0, bad_pixel=40)
    index = dm.datasets["train"].ids.index("b")
    with pytest.raises(DataError) as err:
        dm.datasets["train"][index]
    message = str(err.value)
    assert "\n" not in message and f"label {path} has values [40] outside 0..2 and 255" in message
    assert "data.label_map" in message


def test_label_map_and_class_count_are_part_of_the_cache_key(tmp_path):
    root = write_binary_masks_folder(tmp_path / "masks")
    quiet_check(FolderDataModule(root))
    mapped = quiet_check(FolderDataModule(root, label_map={255: 1}))
    assert not mapped.from_cache and mapped.splits["train"].histogram[1] > 0
    assert quiet_check(FolderDataModule(root, label_map={255: 1})).from_cache


def test_one_worker_and_two_workers_agree(tmp_path, monkeypatch):
    root = write_varied_voc(tmp_path / "d")
    write_sbd(root, {"train": [f"s{k}" for k in range(6)], "val": ["t"]})
    dm = VOCDataModule(root, year=2012, train_split="sbd_train", val_split="val")
    reports = []
    for workers in (1, 2):
        monkeypatch.setenv("FCN_LIGHTNING_CACHE", str(tmp_path / f"cache{workers}"))
        reports.append(quiet_check(dm, workers=workers))
    one, two = reports
    seen = []  # without workers=, the loader setting of the DataModule
    real = labelcheck.DataLoader
    monkeypatch.setattr(
        labelcheck, "DataLoader", lambda *a, **kw: seen.append(kw["num_workers"]) or real(*a, **kw)
    )
    monkeypatch.setenv("FCN_LIGHTNING_CACHE", str(tmp_path / "cache-dm"))
    quiet_check(VOCDataModule(root, year=2012, train_split="sbd_train", num_workers=2))
    assert seen and set(seen) == {2}
    assert not two.from_cache and list(one.splits) == list(two.splits) == ["sbd_train", "val"]
    for key, s in one.splits.items():
        t = two.splits[key]
        np.testing.assert_array_equal(s.histogram, t.histogram)
        assert (s.images, s.ignored, s.pixels, s.empty) == (t.images, t.ignored, t.pixels, t.empty)


# --------------------------------------------------------------------------- every DataModule
def test_voc_with_sbd_mat_labels(tmp_path):
    root = write_varied_voc(tmp_path / "d", year=2011)
    write_sbd(root, {"train": ["s1", "s2", "s3"], "val": ["s4"]})
    report = quiet_check(VOCDataModule(root, year=2011, train_split="sbd_train+voc_train"))
    assert report.splits["sbd_train+voc_train"].images == 3 + 4
    assert report.splits["val"].images == 4
    sbd = [
        scipy.io.loadmat(root / f"benchmark_RELEASE/dataset/cls/s{k}.mat")["GTcls"][0][
            "Segmentation"
        ][0]
        for k in (1, 2, 3)
    ]
    sbd_only = quiet_check(VOCDataModule(root, year=2011, train_split="sbd_train"), ["sbd_train"])
    np.testing.assert_array_equal(sbd_only.splits["sbd_train"].histogram, raw_counts(sbd, 21))


def test_folder_with_varied_images(tmp_path):
    root = write_varied_folder(tmp_path / "d")
    report = quiet_check(FolderDataModule(root))
    assert report.splits["train"].images == 6 and report.splits["val"].images == 3
    assert report.splits["train"].class_names == ("background", "cat", "dog", "car")


def test_nyud_void_and_shift(tmp_path):
    root = write_nyud(tmp_path / "d", {"train": ["1", "2"], "val": ["3"], "test": ["4"]})
    report = quiet_check(NYUDDataModule(root))
    assert list(report.splits) == ["trainval", "test"] and report.splits["trainval"].images == 3
    seg = scipy.io.loadmat(root / "segmentation/img_4.mat")["segmentation"]
    s = report.splits["test"]
    assert s.ignored == int((seg == 0).sum())  # 0 = void -> 255
    np.testing.assert_array_equal(s.histogram, np.bincount(seg[seg > 0] - 1, minlength=40))


def test_siftflow_both_heads(tmp_path):
    root = write_siftflow(tmp_path / "d", train=["a1", "b2"], test=["t1"], unlabelled=["u"])
    report = quiet_check(SiftFlowDataModule(root))
    assert list(report.splits) == ["train/sem", "train/geo", "test/sem", "test/geo"]
    assert report.splits["train/geo"].images == 2
    sem = scipy.io.loadmat(root / "SemanticLabels" / SIFT_SUBDIR / "t1.mat")["S"]
    geo = scipy.io.loadmat(root / "GeoLabels" / SIFT_SUBDIR / "t1.mat")["S"]
    np.testing.assert_array_equal(
        report.splits["test/sem"].histogram, np.bincount(sem[sem > 0] - 1, minlength=33)
    )
    assert report.splits["test/geo"].ignored == int((geo == -1).sum())  # -1 -> void
    assert len(report.splits["test/geo"].histogram) == 3
    mapped = quiet_check(SiftFlowDataModule(root, label_map={2: 255}), ["test"])  # every head
    assert mapped.splits["test/geo"].histogram[2] == 0
    assert mapped.splits["test/sem"].histogram[2] == 0


def test_synthetic_gives_a_trivial_report_at_once():
    report = SyntheticDataModule(train_size=4, val_size=2).check_labels()
    assert report.splits == {} and report.seconds < 0.1 and not report.warnings
    assert report.format().startswith("label check: synthetic scenes")
