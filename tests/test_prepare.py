"""python -m fcn_lightning.prepare and VOCDataModule(download=True) on tiny archives built in
the official layouts: from a local file, from a local HTTP server (resumed downloads), wrong
checksums, damaged archives, a full disk, running twice, and training on the result."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import shutil
import tarfile
import threading
import zipfile
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
from dataset_writers import SIFT_SUBDIR, write_nyud, write_sbd, write_siftflow, write_voc
from test_app import cfg_of
from test_nyud_siftflow import TINY_NOSYN

from fcn_lightning.data import DataError, VOCDataModule, archives
from fcn_lightning.data.archives import ARCHIVES, STAGING_PREFIX
from fcn_lightning.data.voc import prepare_voc
from fcn_lightning.pipeline import train
from fcn_lightning.prepare import main

VOC_TRAIN = ["2011_000001", "2011_000002", "2011_000003"]
VOC_VAL = ["2011_000004", "2011_000005", "2011_000006", "2011_000007"]
SBD_TRAIN = ["2011_000004", "2011_000005", "2008_000001", "2008_000002"]
SBD_VAL = ["2008_000003", "2008_000004"]
SEG11VALID = ["2011_000006", "2011_000007"]  # VOC2011 val minus SBD train


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The archives, in the official layouts: VOC2011's tar holds TrainVal/VOCdevkit/VOC2011
    (torchvision's base_dir), SBD's tgz benchmark_RELEASE/, SIFT Flow's zip a top folder."""
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("archives")
    splits = {"train": VOC_TRAIN, "val": VOC_VAL, "trainval": VOC_TRAIN + VOC_VAL}
    write_voc(src / "voc" / "TrainVal", 2011, splits)
    with tarfile.open(out / "VOCtrainval_25-May-2011.tar", "w") as tar:
        tar.add(src / "voc" / "TrainVal", arcname="TrainVal")
    write_sbd(src / "sbd", {"train": SBD_TRAIN, "val": SBD_VAL})
    (src / "sbd" / "benchmark_RELEASE" / "benchmark_code").mkdir()
    with tarfile.open(out / "benchmark.tgz", "w:gz") as tar:
        tar.add(src / "sbd" / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    sift = write_siftflow(
        src / "SiftFlowDataset",
        train=["coast_a1", "street_b2", "tallbuilding_c3"],
        test=["coast_t1", "highway_t2"],
        unlabelled=["highway_bost181"],
    )
    with zipfile.ZipFile(out / "SiftFlowDataset.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(sift.rglob("*")):
            zf.write(p, str(p.relative_to(src)))
    nyud = write_nyud(src / "nyud", {"train": ["5001", "5002"], "val": ["5003"], "test": ["5004"]})
    lists = src / "nyud_lists"
    lists.mkdir()
    for name in ("train.txt", "val.txt", "test.txt"):  # the reference keeps these in its repo
        (nyud / name).rename(lists / name)
    with tarfile.open(out / "nyud.tar.gz", "w:gz") as tar:
        tar.add(nyud, arcname="nyud")
    Built = namedtuple("Built", "voc sbd sift nyud nyud_lists")
    return Built(
        out / "VOCtrainval_25-May-2011.tar",
        out / "benchmark.tgz",
        out / "SiftFlowDataset.zip",
        out / "nyud.tar.gz",
        lists,
    )


@pytest.fixture
def official(built, monkeypatch):
    """The test archives' md5s stand in for the published ones."""
    monkeypatch.setitem(ARCHIVES, "voc2011", replace(ARCHIVES["voc2011"], md5=md5(built.voc)))
    monkeypatch.setitem(ARCHIVES, "sbd", replace(ARCHIVES["sbd"], md5=md5(built.sbd)))
    return built


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(STAGING_PREFIX)]


# --------------------------------------------------------------------------- from a local archive
def test_prepare_voc_and_sbd_from_archives_twice_and_check(official, tmp_path, capsys):
    root = tmp_path / "pascal"
    assert main(["voc", "--year", "2011", "--root", str(root), "--archive", str(official.voc)]) == 0
    out = capsys.readouterr().out
    assert (root / "VOCdevkit" / "VOC2011" / "JPEGImages" / "2011_000001.jpg").is_file()
    assert "layout: complete" in out and "train,val" not in out
    assert main(["sbd", "--root", str(root), "--archive", str(official.sbd)]) == 0
    out = capsys.readouterr().out
    # per split: listed, images, labels, official; seg11valid from VOCDataModule.split_ids
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:2] == "  "}
    assert rows["seg11valid"] == ["2", "2", "2", "736"]
    assert rows["sbd_train"] == ["4", "4", "4", "8,498"] and rows["train"][-1] == "1,112"
    assert "warning: seg11valid: 2 listed, the official split has 736" in out
    assert not (root / "benchmark_RELEASE" / "benchmark_code").exists()  # only dataset/
    assert leftovers(root) == []
    # twice: nothing to do, nothing touched
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    assert main(["voc", "--year", "2011", "--root", str(root), "--archive", str(official.voc)]) == 0
    assert main(["sbd", "--root", str(root), "--archive", str(official.sbd)]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    assert main(["check", "voc", "--year", "2011", "--root", str(root)]) == 0
    assert "seg11valid" in capsys.readouterr().out
    dm = VOCDataModule(root, year=2011, train_split="sbd_train", val_split="seg11valid")
    assert dm.check_layout(["seg11valid"]).count("seg11valid") == len(SEG11VALID)


def test_check_names_a_missing_file(official, tmp_path, capsys):
    root = tmp_path / "pascal"
    prepare_voc(root, 2011, archive=official.voc, say=lambda _: None)
    (root / "VOCdevkit" / "VOC2011" / "SegmentationClass" / "2011_000002.png").unlink()
    assert main(["check", "voc", "--year", "2011", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "error: train: 1 listed file(s) missing:" in out and "2011_000002.png" in out
    # prepare again: refuses to touch the incomplete copy, says what is wrong and what to do
    assert main(["voc", "--year", "2011", "--root", str(root), "--archive", str(official.voc)]) == 1
    err = capsys.readouterr().err
    assert "incomplete" in err and "2011_000002.png" in err and "Move it away" in err
    assert (root / "VOCdevkit" / "VOC2011" / "JPEGImages" / "2011_000002.jpg").is_file()


def test_wrong_checksum_names_file_and_leaves_nothing(built, tmp_path, capsys):
    root = tmp_path / "pascal"  # ARCHIVES not patched: torchvision's md5 for the real tar
    assert main(["voc", "--year", "2011", "--root", str(root), "--archive", str(built.voc)]) == 1
    err = capsys.readouterr().err
    assert str(built.voc) in err and ARCHIVES["voc2011"].md5 in err and md5(built.voc) in err
    assert "Download it again" in err and f"--md5 {md5(built.voc)}" in err
    assert not (root / "VOCdevkit").exists() and leftovers(tmp_path) == []
    # --md5 of a mirror's copy is accepted
    args = ["--archive", str(built.voc), "--md5", md5(built.voc)]
    assert main(["voc", "--year", "2011", "--root", str(root), *args]) == 0


@pytest.mark.parametrize("which", ["voc", "sbd", "sift", "nyud"])
def test_truncated_archive_fails_clearly_and_leaves_nothing(built, tmp_path, capsys, which):
    whole = getattr(built, which)
    cut = tmp_path / whole.name
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    root = tmp_path / "root"
    command = {"voc": ["voc", "--year", "2011"], "sift": ["siftflow"]}.get(which, [which])
    assert main([*command, "--root", str(root), "--archive", str(cut), "--md5", md5(cut)]) == 1
    err = capsys.readouterr().err
    assert str(cut) in err and "damaged or incomplete" in err and "download it again" in err
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert left in ([], [archives.LOCK_NAME]) and cut.is_file()


def test_full_disk_is_refused_before_extracting(official, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    root = tmp_path / "pascal"
    assert main(["voc", "--year", "2011", "--root", str(root), "--archive", str(official.voc)]) == 1
    err = capsys.readouterr().err
    assert "not enough free space" in err and str(root) in err and "needs about" in err
    assert not (root / "VOCdevkit").exists() and leftovers(tmp_path) == []


def test_disk_filling_up_mid_extraction_leaves_nothing(official, tmp_path, monkeypatch, capsys):
    real, calls = tarfile.TarFile.makefile, []

    def makefile(self, tarinfo, targetpath):
        calls.append(targetpath)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tarinfo, targetpath)

    monkeypatch.setattr(tarfile.TarFile, "makefile", makefile)
    root = tmp_path / "pascal"
    assert main(["voc", "--year", "2011", "--root", str(root), "--archive", str(official.voc)]) == 1
    err = capsys.readouterr().err
    assert "disk filled up" in err and str(root) in err and "needs about" in err
    assert len(calls) == 5 and not (root / "VOCdevkit").exists() and leftovers(tmp_path) == []


def test_member_outside_the_folder_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.tar"
    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "x.txt", arcname="../x.txt")
    root = tmp_path / "root"
    assert main(["siftflow", "--root", str(root), "--archive", str(evil)]) == 1
    assert "outside its own folder" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- SIFT Flow, NYUDv2
def test_prepare_siftflow_and_train_on_it(built, tmp_path, capsys):
    root = tmp_path / "SiftFlowDataset"
    assert main(["siftflow", "--root", str(root), "--archive", str(built.sift)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:2] == "  "}
    assert rows["all"] == ["6", "6", "5", "5", "2,688"]
    assert rows["train"] == ["3", "3", "3", "3", "2,486"] and rows["test"][0] == "2"
    assert "1 image(s) without annotation, left out of training: highway_bost181" in out
    assert (root / "Images" / SIFT_SUBDIR).is_dir() and (root / "TestSet1.txt").is_file()
    assert main(["siftflow", "--root", str(root), "--archive", str(built.sift)]) == 0
    assert "already prepared" in capsys.readouterr().out
    cfg = cfg_of(
        "config",
        ["arch=fcn32s", "staged=false", "data=siftflow", f"data.root={root}", *TINY_NOSYN],
        tmp_path / "run",
    )
    train(cfg)
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())["fcn32s"]) == {
        "sem",
        "geo",
    }


def test_prepare_nyud_names_the_missing_lists_then_takes_them(built, tmp_path, capsys):
    root = tmp_path / "nyud"
    assert main(["nyud", "--root", str(root), "--archive", str(built.nyud)]) == 1
    out = capsys.readouterr().out
    assert "train.txt, val.txt, test.txt not found" in out and "fcn.berkeleyvision.org" in out
    assert "--lists" in out and (root / "segmentation").is_dir()
    args = ["--archive", str(built.nyud), "--lists", str(built.nyud_lists)]
    assert main(["nyud", "--root", str(root), *args]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:2] == "  "}
    assert rows["trainval"] == ["3", "3", "3", "3", "3", "795"] and rows["test"][-1] == "654"
    assert "already prepared" in out


# --------------------------------------------------------------------------- downloads
class Server:
    """Files over HTTP on 127.0.0.1 with Range support; ``cut`` halves the next N responses
    (Content-Length says the whole size, then the connection closes)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.ranges, self.cut = files, [], 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = server.files.get(self.path.lstrip("/"))
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if (wanted := self.headers.get("Range")) is not None:
                    server.ranges.append(wanted)
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                self.send_response(206 if start else 200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.cut:
                    server.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def served(official, monkeypatch):
    server = Server({"voc.tar": official.voc, "benchmark.tgz": official.sbd})
    monkeypatch.setitem(
        ARCHIVES, "voc2011", replace(ARCHIVES["voc2011"], url=f"{server.url}/voc.tar")
    )
    monkeypatch.setitem(
        ARCHIVES, "sbd", replace(ARCHIVES["sbd"], url=f"{server.url}/benchmark.tgz")
    )
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_download_resumes_a_part_file_and_a_cut_transfer(served, official, tmp_path, capsys):
    root = tmp_path / "pascal"
    root.mkdir()
    name = ARCHIVES["voc2011"].filename
    head = official.voc.read_bytes()[:5000]
    (root / f"{name}.part").write_bytes(head)  # a download interrupted before
    served.cut = 1  # and this one is cut off once more
    assert main(["voc", "--year", "2011", "--root", str(root)]) == 0
    assert served.ranges[0] == "bytes=5000-" and len(served.ranges) == 2
    assert int(served.ranges[1].removeprefix("bytes=").rstrip("-")) > 5000
    assert md5(root / name) == md5(official.voc) and not (root / f"{name}.part").exists()
    assert "layout: complete" in capsys.readouterr().out


def test_download_with_a_wrong_checksum_names_the_part_file(served, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ARCHIVES, "sbd", replace(ARCHIVES["sbd"], md5="0" * 32))
    root = tmp_path / "pascal"
    assert main(["sbd", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    part = root / f"{ARCHIVES['sbd'].filename}.part"
    assert str(part) in err and "0" * 32 in err and f"delete {part}" in err
    assert not (root / "benchmark_RELEASE").exists() and leftovers(tmp_path) == []


def test_no_network_says_what_to_fetch_and_the_command(built, tmp_path, monkeypatch, capsys):
    closed = "http://127.0.0.1:9/benchmark.tgz"  # the discard port: nothing listens there
    monkeypatch.setitem(ARCHIVES, "sbd", replace(ARCHIVES["sbd"], url=closed))
    root = tmp_path / "pascal"
    assert main(["sbd", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"cannot download {closed}" in err and "benchmark.tgz" in err
    assert f"python -m fcn_lightning.prepare sbd --root {root} --archive" in err


def test_datamodule_download_true_prepares_what_its_splits_read(served, tmp_path):
    root = tmp_path / "empty"
    dm = VOCDataModule(
        root, year=2011, download=True, train_split="sbd_train", val_split="seg11valid",
        batching="pad", crop_size=None, scale_range=None, hflip=False,
    )  # fmt: skip
    assert dm.needed() == (True, True)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(SBD_TRAIN) and len(dm.datasets["val"]) == 2
    assert dm.check_layout().ok
    dm.prepare_data()  # Lightning calls it again: nothing to do
    with pytest.raises(DataError, match="data.root"):
        VOCDataModule(None, download=True).prepare_data()


def test_train_with_data_download_true_on_an_empty_root(served, tmp_path):
    """The run's checks (setup, label check) come after the download, not before it."""
    root = tmp_path / "pascal"
    cfg = cfg_of(
        "config",
        ["arch=fcn32s", "staged=false", "data=voc", f"data.root={root}", "data.year=2011",
         "data.download=true", *TINY_NOSYN],
        tmp_path / "run",
    )  # fmt: skip
    train(cfg)
    assert (root / "VOCdevkit" / "VOC2011").is_dir() and (root / "benchmark_RELEASE").is_dir()
    assert "fcn32s" in json.loads((tmp_path / "run" / "metrics.json").read_text())
