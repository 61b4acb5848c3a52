"""python -m fcn_lightning.prepare and VOCDataModule(download=True) on tiny archives built in
the official layouts: from a local file, from a local HTTP server (resumed downloads, --url),
wrong checksums, damaged archives, a full disk, running twice, read-only roots, a root that is
a file, signals and stale temporary folders, and training on the result."""

from __future__ import annotations

import builtins
import errno
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import tarfile
import threading
import zipfile
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import TINY_NOSYN, cfg_of
from helpers.datasets import SIFT_SUBDIR, write_nyud, write_sbd, write_siftflow, write_voc

from fcn_lightning.app.train import train
from fcn_lightning.data import DataError, NYUDDataModule, SiftFlowDataModule, VOCDataModule
from fcn_lightning.data.sources import ARCHIVES
from fcn_lightning.prepare import archives
from fcn_lightning.prepare.archives import STAGING_PREFIX, mib
from fcn_lightning.prepare.cli import main
from fcn_lightning.prepare.datasets import download, prepare_sbd, prepare_voc

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
    assert "method gz" not in err  # tarfile's list of what it tried: not for users
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
    assert "disk full on" in err and str(root) in err and "needs about" in err
    assert len(calls) == 5 and not (root / "VOCdevkit").exists() and leftovers(tmp_path) == []


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """What is in ``folder`` (file contents; None for a folder), less the lock file."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
        if p.name != archives.LOCK_NAME
    }


def error_of(err: str) -> str:
    """The one line of the error (after tqdm's progress bar, where there is one)."""
    assert err.endswith("\n") and err.count("Error: ") == 1 and "Traceback" not in err
    return err.splitlines()[-1]


def fake_statvfs(blocks_free: int, inodes_free: int) -> os.statvfs_result:
    """A file system of 4 KiB blocks, 1 GiB and 100,000 inodes, with what is said free."""
    return os.statvfs_result(
        (4096, 4096, 2**18, blocks_free, blocks_free, 10**5) + (inodes_free,) * 2 + (0, 255)
    )


@pytest.mark.parametrize("short", ["inodes", "blocks", "quota"])
def test_no_room_mid_extraction_says_which_resource_ran_out(
    official, tmp_path, monkeypatch, capsys, short
):
    """An ENOSPC with blocks free is the inodes; one with inodes free, the blocks; EDQUOT the
    quota. The free space was enough when checked, then ran out (other writers)."""
    root = tmp_path / "pascal"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    before, full, real = snapshot(tmp_path), [], tarfile.TarFile.makefile

    def makefile(self, tarinfo, targetpath):
        if len(full) == 0 and "JPEGImages" in targetpath:
            full.append(targetpath)
            code = errno.EDQUOT if short == "quota" else errno.ENOSPC
            raise OSError(code, os.strerror(code), targetpath)
        return real(self, tarinfo, targetpath)

    after = {"inodes": fake_statvfs(50 * 256, 0), "blocks": fake_statvfs(3, 90_000)}
    monkeypatch.setattr(tarfile.TarFile, "makefile", makefile)
    monkeypatch.setattr(
        os,
        "statvfs",
        lambda _: (
            after.get(short, fake_statvfs(50 * 256, 90_000))
            if full
            else fake_statvfs(50 * 256, 90_000)
        ),
    )
    assert main(["voc", "--root", str(root), "--archive", str(official.voc)]) == 1
    err = error_of(capsys.readouterr().err)
    assert full and str(root) in err
    assert "while extracting VOCtrainval_25-May-2011.tar" in err and "nothing was kept" in err
    if short == "inodes":
        assert (
            "Error: no free inodes on " in err and "files and folders to write, 50 MiB free" in err
        )
        assert "disk full" not in err
    elif short == "blocks":
        assert "Error: disk full on " in err and "needs about" in err and "12 KiB free" in err
        assert "inode" not in err
    else:
        assert "Error: disk quota exceeded on " in err and "larger quota" in err
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_no_inode_even_for_the_lock_leaves_nothing(official, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data" / "pascal"
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if Path(file).name == archives.LOCK_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(archives, "open", fake_open, raising=False)
    monkeypatch.setattr(os, "statvfs", lambda _: fake_statvfs(50 * 256, 0))
    assert main(["voc", "--root", str(root), "--archive", str(official.voc)]) == 1
    err = error_of(capsys.readouterr().err)
    assert err.startswith("Error: no free inodes on ") and "while preparing VOC2011" in err
    assert not (tmp_path / "data").exists()


def test_empty_root_is_refused_not_the_current_folder(official, tmp_path, monkeypatch, capsys):
    """``--root "$UNSET"``: not the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for command in (["voc", "--archive", str(official.voc)], ["check", "voc"]):
        assert main([*command, "--root", ""]) == 1
        out, err = capsys.readouterr()
        assert err == (
            "Error: --root is empty (an unset variable?): give the folder the dataset goes in "
            "(data.root)\n"
        )
        assert out == "" and snapshot(tmp_path) == before
    assert not (tmp_path / archives.LOCK_NAME).exists()


def test_archive_that_is_not_a_regular_file_is_named(official, tmp_path, capsys):
    root = tmp_path / "pascal"
    prepare_voc(root, 2011, archive=official.voc, say=lambda _: None)
    before = snapshot(tmp_path)
    for where in (root, tmp_path / "new"):  # refused even with nothing to do, before any work
        assert main(["voc", "--root", str(where), "--archive", "/dev/null"]) == 1
        err = error_of(capsys.readouterr().err)
        assert err == (
            "Error: --archive /dev/null is not a regular file (a device, a pipe or a socket): "
            "give the archive file itself"
        )
    assert snapshot(tmp_path) == before


def test_archive_with_windows_separators(tmp_path, capsys):
    """A zip written on Windows ('\\' in its names) is read as zipfile reads it on Windows,
    still kept inside the folder; a tar with such names is refused, naming a member."""
    splits = {"train": VOC_TRAIN, "val": VOC_VAL, "trainval": VOC_TRAIN + VOC_VAL}
    src = write_voc(tmp_path / "src", 2011, splits)
    (tmp_path / "evil.txt").write_text("mine")
    windows = tmp_path / "VOCtrainval_25-May-2011.zip"
    with zipfile.ZipFile(windows, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, str(p.relative_to(src)).replace("/", "\\"))
        zf.writestr("..\\..\\evil.txt", "outside")  # dropped '..', as for '/' names
    root = tmp_path / "pascal"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    args = ["--root", str(root), "--archive", str(windows), "--md5", md5(windows)]
    assert main(["voc", "--year", "2011", *args]) == 0
    assert "layout: complete" in capsys.readouterr().out
    jpg = root / "VOCdevkit" / "VOC2011" / "JPEGImages" / "2011_000001.jpg"
    assert (
        jpg.read_bytes() == (src / "VOCdevkit" / "VOC2011" / "JPEGImages" / jpg.name).read_bytes()
    )
    assert (tmp_path / "evil.txt").read_text() == "mine" and not list(tmp_path.rglob("*\\*"))
    # a tar with such names: one sentence naming a member and the separators
    tar = tmp_path / "windows.tar"
    with tarfile.open(tar, "w") as t:
        for p in sorted(src.rglob("*")):
            t.add(p, arcname=str(p.relative_to(src)).replace("/", "\\"), recursive=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = snapshot(other)
    assert main(["voc", "--root", str(other), "--archive", str(tar), "--md5", md5(tar)]) == 1
    err = error_of(capsys.readouterr().err)
    member = "VOCdevkit\\VOC2011\\ImageSets\\Segmentation\\train.txt"
    assert err == (
        f"Error: {tar} uses Windows '\\' separators in its member names (e.g. '{member}'): "
        "re-create it with '/' separators, or extract it with a tool that converts them"
    )
    assert snapshot(other) == before and leftovers(tmp_path) == []


def test_member_outside_the_folder_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.tar"
    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "x.txt", arcname="../x.txt")
    root = tmp_path / "root"
    assert main(["siftflow", "--root", str(root), "--archive", str(evil)]) == 1
    assert "outside its own folder" in capsys.readouterr().err
    # a link pointing out of the folder, beside a dataset that would otherwise be found
    link = tarfile.TarInfo("SiftFlowDataset/TestSet1.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tarfile.open(evil, "w") as tar:
        tar.addfile(link)
    assert main(["siftflow", "--root", str(root), "--archive", str(evil)]) == 1
    assert "outside its own folder or of a refused kind" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and not (root / "TestSet1.txt").exists()


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
def server(official):
    """The test archives over HTTP: a mirror for --url."""
    server = Server({"voc.tar": official.voc, "benchmark.tgz": official.sbd})
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def served(server, monkeypatch):
    """The mirror as the official address (the DataModule has no --url)."""
    monkeypatch.setitem(
        ARCHIVES, "voc2011", replace(ARCHIVES["voc2011"], url=f"{server.url}/voc.tar")
    )
    monkeypatch.setitem(
        ARCHIVES, "sbd", replace(ARCHIVES["sbd"], url=f"{server.url}/benchmark.tgz")
    )
    return server


def test_download_resumes_a_part_file_and_a_cut_transfer(server, official, tmp_path, capsys):
    root = tmp_path / "pascal"
    root.mkdir()
    name = ARCHIVES["voc2011"].filename
    head = official.voc.read_bytes()[:5000]
    (root / f"{name}.part").write_bytes(head)  # a download interrupted before
    server.cut = 1  # and this one is cut off once more
    assert (
        main(["voc", "--year", "2011", "--root", str(root), "--url", f"{server.url}/voc.tar"]) == 0
    )
    assert server.ranges[0] == "bytes=5000-" and len(server.ranges) == 2
    assert int(server.ranges[1].removeprefix("bytes=").rstrip("-")) > 5000
    assert md5(root / name) == md5(official.voc) and not (root / f"{name}.part").exists()
    out = capsys.readouterr().out
    assert f"Resuming {name}.part at 5 KiB" in out and "layout: complete" in out


def test_sizes_keep_a_decimal_below_10_mib():
    assert mib(0.74 * 2**20) == "0.7 MiB" and mib(5000) == "5 KiB" and mib(9.5 * 2**20) == "9.5 MiB"
    assert mib(300 * 2**20) == "300 MiB" and mib(1.9 * 2**30) == "1.9 GiB"


def test_download_with_a_wrong_checksum_names_the_part_file(server, tmp_path, capsys):
    root = tmp_path / "pascal"
    url = f"{server.url}/benchmark.tgz"
    assert main(["sbd", "--root", str(root), "--url", url, "--md5", "0" * 32]) == 1
    err = capsys.readouterr().err
    part = root / f"{ARCHIVES['sbd'].filename}.part"
    assert str(part) in err and "0" * 32 in err and f"delete {part}" in err
    assert not (root / "benchmark_RELEASE").exists() and leftovers(tmp_path) == []


def test_url_of_a_mirror_keeps_the_published_md5(server, official, tmp_path, capsys):
    root = tmp_path / "pascal"
    wrong = f"{server.url}/benchmark.tgz"  # the mirror serves another file under that name
    assert main(["voc", "--root", str(root), "--url", wrong]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and md5(official.voc) in err  # the published one
    (root / f"{ARCHIVES['voc2011'].filename}.part").unlink()
    assert main(["voc", "--root", str(root), "--url", f"{server.url}/voc.tar"]) == 0
    assert "--url" in main_help(["voc"], capsys) and "mirror" in main_help(["sbd"], capsys)
    with pytest.raises(SystemExit):  # a copy you have, or a download: not both
        main(["voc", "--root", str(root), "--url", wrong, "--archive", str(official.voc)])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["voc", "--root", str(root), "--url", "mirror.example/voc.tar"]) == 1
    assert "not an address to download from" in capsys.readouterr().err


def main_help(command: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return capsys.readouterr().out


def test_no_network_says_what_to_fetch_and_the_command(built, tmp_path, capsys):
    closed = "http://127.0.0.1:9/benchmark.tgz"  # the discard port: nothing listens there
    root = tmp_path / "data" / "pascal"
    assert main(["sbd", "--root", str(root), "--url", closed]) == 1
    err = capsys.readouterr().err
    assert f"cannot download {closed}" in err and "benchmark.tgz" in err
    assert f"python -m fcn_lightning.prepare sbd --root {root} --archive" in err
    # the run made the root and removed it again: the suggested place must be made first
    assert not (tmp_path / "data").exists() and f"create {root} first: mkdir -p {root}" in err
    root.mkdir(parents=True)
    assert main(["sbd", "--root", str(root), "--url", closed]) == 1
    assert "mkdir" not in capsys.readouterr().err and root.is_dir()


def test_datamodule_download_true_prepares_what_its_splits_read(served, tmp_path):
    root = tmp_path / "empty"
    dm = VOCDataModule(
        root, year=2011, download=download, train_split="sbd_train", val_split="seg11valid",
        batching="pad", crop_size=None, scale_range=None, hflip=False,
    )  # fmt: skip
    assert dm.needed() == (True, True)
    with pytest.raises(DataError, match="does not exist"):  # setup never downloads
        dm.setup("fit")
    assert not root.exists()
    dm.prepare_data()
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


# --------------------------------------------------------------------------- read-only roots
@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: every write under ``folder`` (open for writing, mkdir, rename,
    unlink, rmdir) fails with EROFS, as on a read-only mount (the tests run as root, which
    chmod does not stop); ``read_only(folder, errno.EACCES)`` for a folder not one's own."""
    frozen: dict[Path, int] = {}

    def refused(path) -> int | None:
        if isinstance(path, int):
            return None
        p = Path(os.fsdecode(path)).absolute()
        return next((code for f, code in frozen.items() if p == f or f in p.parents), None)

    def guard(real):
        def wrapped(path, *args, **kwargs):
            if (code := refused(path)) is not None:
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real(path, *args, **kwargs)

        return wrapped

    for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            return guard(real_open)(file, mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return lambda folder, code=errno.EROFS: frozen.__setitem__(Path(folder).absolute(), code)


def test_read_only_complete_root_is_fine_for_prepare_and_download_true(
    official, tmp_path, read_only, capsys
):
    root = tmp_path / "pascal"
    say = lambda _: None  # noqa: E731
    prepare_voc(root, 2011, archive=official.voc, say=say)
    prepare_sbd(root, archive=official.sbd, say=say)
    (root / archives.LOCK_NAME).unlink()  # as if prepared by someone else, elsewhere
    read_only(root)
    # the default year is data=voc's: 2011
    assert main(["voc", "--root", str(root)]) == 0
    assert main(["sbd", "--root", str(root), "--archive", str(official.sbd)]) == 0
    out = capsys.readouterr().out
    assert out.count("already prepared") == 2 and "layout: complete" in out
    assert main(["check", "voc", "--root", str(root)]) == 0
    dm = VOCDataModule(
        root, year=2011, download=download, train_split="sbd_train", val_split="seg11valid",
        batching="pad", crop_size=None, scale_range=None, hflip=False,
    )  # fmt: skip
    dm.prepare_data()  # a shared read-only /data with data.download=true
    dm.setup("fit")
    assert len(dm.datasets["val"]) == len(SEG11VALID)
    assert not (root / archives.LOCK_NAME).exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_root_with_work_to_do_names_the_folder(
    official, tmp_path, read_only, capsys, code
):
    root = tmp_path / "pascal"
    root.mkdir()
    read_only(root, code)
    assert main(["voc", "--root", str(root), "--archive", str(official.voc)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error: cannot write in {root} ({os.strerror(code)})")
    assert "VOC2011 is not prepared" in err and "Traceback" not in err
    # a root to make under a folder that cannot be written: that folder is named
    parent = tmp_path / "shared"
    parent.mkdir()
    read_only(parent, code)
    assert main(["voc", "--root", str(parent / "pascal"), "--archive", str(official.voc)]) == 1
    assert f"cannot write in {parent} (" in capsys.readouterr().err
    # an incomplete dataset on a read-only root: the incompleteness is the news
    write_voc(tmp_path / "other", 2011, {"train": VOC_TRAIN})
    read_only(tmp_path / "other", code)
    assert main(["voc", "--root", str(tmp_path / "other")]) == 1
    assert "exist(s) but the layout is incomplete" in capsys.readouterr().err


# --------------------------------------------------------------------------- a root that is a file
def test_root_that_is_a_file_is_named(official, tmp_path, capsys):
    afile = tmp_path / "pascal.txt"
    afile.write_text("not a folder")
    assert main(["voc", "--root", str(afile), "--archive", str(official.voc)]) == 1
    assert f"Error: {afile} is a file, not a folder: --root" in capsys.readouterr().err
    under_file = afile / "sub"
    assert main(["siftflow", "--root", str(under_file), "--archive", str(official.sbd)]) == 1
    assert f"{afile} is a file, so {under_file} cannot be a folder" in capsys.readouterr().err
    assert main(["check", "voc", "--root", str(afile)]) == 1
    err = capsys.readouterr().err
    assert f"{afile} is a file, not a folder" in err and "does not exist" not in err
    with pytest.raises(DataError, match="is a file, not a folder"):
        VOCDataModule(afile, year=2011).setup("fit")
    assert afile.read_text() == "not a folder"


# --------------------------------------------------------------------------- check agrees with training
def test_check_requires_the_voc_of_the_year_asked(official, tmp_path, capsys):
    root = tmp_path / "pascal"
    write_voc(root, 2012, {"train": VOC_TRAIN, "val": VOC_VAL, "trainval": VOC_TRAIN + VOC_VAL})
    prepare_sbd(root, archive=official.sbd, say=lambda _: None)
    assert main(["check", "voc", "--year", "2011", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    voc2011, voc2012 = root / "VOCdevkit" / "VOC2011", root / "VOCdevkit" / "VOC2012"
    assert f"error: VOC2011 not found: {voc2011} does not exist ({voc2012} is there" in out
    assert "--year 2012" in out and "layout: INCOMPLETE" in out
    assert main(["check", "voc", "--root", str(root)]) == 1  # the default: 2011, as data=voc
    assert main(["check", "voc", "--year", "2012", "--root", str(root)]) == 0
    # training says the same
    dm = VOCDataModule(root, year=2011, train_split="sbd_train", val_split="seg11valid")
    with pytest.raises(DataError, match="VOC2011 not found"):
        dm.setup("fit")


@pytest.mark.parametrize("dataset", ["voc", "siftflow", "nyud"])
def test_check_of_a_root_without_the_dataset_is_not_complete(tmp_path, capsys, dataset):
    (tmp_path / "unrelated.txt").write_text("x")
    assert main(["check", dataset, "--root", str(tmp_path)]) == 1
    assert "layout: INCOMPLETE" in capsys.readouterr().out


# --------------------------------------------------------------------------- signals, stale folders
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_remove_the_extraction(official, tmp_path, monkeypatch, capsys, signame):
    signum = getattr(signal, signame)
    real = archives.extract

    def extract_then_signal(path, names, into):
        real(path, names, into)
        assert any(into.iterdir())  # something to clean up
        os.kill(os.getpid(), signum)  # the handler raises here

    monkeypatch.setattr(archives, "extract", extract_then_signal)
    before = signal.signal(signum, lambda *_: pytest.fail(f"{signame} not handled"))
    try:
        mine = signal.getsignal(signum)
        root = tmp_path / "pascal"
        assert main(["voc", "--root", str(root), "--archive", str(official.voc)]) == 128 + signum
        assert signal.getsignal(signum) is mine  # the previous handler is back
    finally:
        signal.signal(signum, before)
    out, err = capsys.readouterr()
    assert f"Stopped by {signame}" in err and "Removed the unfinished extraction" in out
    assert leftovers(tmp_path) == [] and not (root / "VOCdevkit").exists()


def test_stale_extraction_of_a_killed_run_is_removed(official, tmp_path, capsys):
    root = tmp_path / "pascal"
    stale = root / f"{STAGING_PREFIX}k1ll3d"  # SIGKILL: nothing could clean up
    (stale / "TrainVal" / "VOCdevkit").mkdir(parents=True)
    assert main(["voc", "--root", str(root), "--archive", str(official.voc)]) == 0
    out = capsys.readouterr().out
    assert f"Removed an unfinished extraction left by an earlier run: {stale}" in out
    assert leftovers(tmp_path) == []
    # and on a root where nothing else needs doing
    (stale / "x").mkdir(parents=True)
    assert main(["voc", "--root", str(root), "--archive", str(official.voc)]) == 0
    out = capsys.readouterr().out
    assert "already prepared" in out and f"earlier run: {stale}" in out and not stale.exists()


# --------------------------------------------------------------------------- options checked first
def test_wrong_archive_of_another_year_says_which_year(tmp_path, capsys):
    src = write_voc(tmp_path / "src", 2012, {"train": VOC_TRAIN, "val": VOC_VAL})
    tar = tmp_path / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src / "VOCdevkit", arcname="VOCdevkit")
    root = tmp_path / "pascal"
    args = ["--root", str(root), "--archive", str(tar), "--md5", md5(tar)]
    assert main(["voc", "--year", "2011", *args]) == 1
    err = capsys.readouterr().err
    told = "does not hold VOCdevkit/VOC2011: it holds VOCdevkit/VOC2012: pass --year 2012"
    assert f"{tar} {told}" in err
    assert main(["siftflow", *args]) == 1  # no hint known: what the archive holds
    assert (
        "does not hold the SIFT Flow dataset (the folder of TestSet1.txt): it holds VOCdevkit"
        in (capsys.readouterr().err)
    )


def test_an_archive_of_the_right_year_but_incomplete_says_what_it_holds(tmp_path, capsys):
    tar = tmp_path / "VOCtrainval_25-May-2011.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("VOCdevkit/VOC2011/readme.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    root = tmp_path / "pascal"
    assert main(["voc", "--root", str(root), "--archive", str(tar), "--md5", md5(tar)]) == 1
    err = error_of(capsys.readouterr().err)
    assert "does not hold VOCdevkit/VOC2011: what it holds of it is incomplete" in err
    assert "--year" not in err  # no other year to offer
    assert not root.exists() or not any(root.iterdir())


def test_not_an_archive_is_one_plain_sentence(tmp_path, capsys):
    junk = tmp_path / "VOCtrainval_25-May-2011.tar"
    junk.write_bytes(os.urandom(3000))
    assert (
        main(["voc", "--root", str(tmp_path / "r"), "--archive", str(junk), "--md5", md5(junk)])
        == 1
    )
    err = capsys.readouterr().err
    assert f"{junk} is neither a tar nor a zip archive, or is damaged" in err
    assert "method" not in err and "\n" not in err.strip()


def test_options_are_checked_before_any_work(official, tmp_path, monkeypatch, capsys):
    root = tmp_path / "pascal"
    prepare_voc(root, 2011, archive=official.voc, say=lambda _: None)
    monkeypatch.setattr(archives, "calculate_md5", lambda _: pytest.fail("hashed"))
    assert main(["voc", "--root", str(root), "--archive", str(official.voc), "--md5", "zzz"]) == 1
    assert "--md5 'zzz' is not an md5: it is 32 hexadecimal digits" in capsys.readouterr().err
    # an archive named that is not there: refused, even with nothing to do
    gone = tmp_path / "VOCtrainval_25-May-2011.tar"
    assert main(["voc", "--root", str(root), "--archive", str(gone)]) == 1
    assert f"--archive {gone}: no such file" in capsys.readouterr().err
    assert main(["voc", "--root", str(tmp_path / "new"), "--archive", str(tmp_path)]) == 1
    assert f"--archive {tmp_path} is a folder, not an archive" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert "(default: 2011)" in main_help(["voc"], capsys)


# --------------------------------------------------------------------------- training's messages
def test_training_layout_messages_name_prepare_addresses_and_the_root(tmp_path):
    nowhere = tmp_path / "no where"
    with pytest.raises(DataError) as info:
        VOCDataModule(nowhere, year=2011).setup("fit")
    text = str(info.value)
    assert ARCHIVES["voc2011"].url in text and ARCHIVES["sbd"].url in text
    assert f"prepare voc --year 2011 --root '{nowhere}'" in text and "<data.root>" not in text
    assert "host.robots" not in text
    for dm, key in ((SiftFlowDataModule(nowhere), "siftflow"), (NYUDDataModule(nowhere), "nyud")):
        with pytest.raises(DataError) as info:
            dm.setup("fit")
        text = str(info.value)
        assert ARCHIVES[key].url in text and f"--root '{nowhere}'" in text
