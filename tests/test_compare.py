"""python -m fcn_lightning.compare: one table across runs (a row per run and stage, the settings
that differ, the four metrics in per cent, the paper's numbers), as markdown, csv and json, and
the val curves from the runs' own logs."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, cfg_of
from helpers.launcher import cli
from omegaconf import OmegaConf

from fcn_lightning.compare import differing, find_runs, main, plot, read_run
from fcn_lightning.contract import METRIC_NAMES
from fcn_lightning.reports import METRIC_TITLES

TITLES = [METRIC_TITLES[k] for k in METRIC_NAMES]  # mIoU %, pixel acc, mean acc, fwIoU


def copy_run(src: Path, dst: Path, changes: dict | None = None, scale: float = 1.0) -> Path:
    """A copy of a trained run (no checkpoints) with its config's ``changes`` written to
    .hydra/config.yaml, its metrics.json's numbers times ``scale``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.ckpt"))
    config = OmegaConf.create(json.loads((dst / "run.json").read_text())["config"])
    for key, value in (changes or {}).items():
        OmegaConf.update(config, key, value, force_add=True)
    (dst / ".hydra").mkdir()
    OmegaConf.save(config, dst / ".hydra" / "config.yaml")
    metrics = json.loads((dst / "metrics.json").read_text())
    for block in metrics.values():
        block.update({k: block[k] * scale for k in METRIC_NAMES})
        block["per_class_IoU"] = {c: v * scale for c, v in block["per_class_IoU"].items()}
    (dst / "metrics.json").write_text(json.dumps(metrics))
    return dst


def compare(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()]
    assert set("".join(lines[1])) == {"-"}, text  # the header's rule
    return [dict(zip(lines[0], line, strict=True)) for line in lines[2:]]


def expected(run: Path, name: str) -> list[dict[str, str]]:
    """The rows metrics.json of ``run`` gives: run, stage, the four metrics as printed."""
    metrics = json.loads((run / "metrics.json").read_text())
    return [{"run": name, "stage": stage} | {t: f"{100 * block[k]:.1f}" for k, t in zip(METRIC_NAMES, TITLES, strict=True)}
            for stage, block in metrics.items()]  # fmt: skip


@pytest.fixture
def three(tiny_run, tiny_run32, tmp_path) -> list[Path]:
    """Three runs: the staged tiny run, a copy with another lr, seed and data.root (and other
    numbers), the FCN-32s run (its own paths.output_dir)."""
    a = copy_run(tiny_run[0], tmp_path / "a")
    b = copy_run(
        tiny_run[0], tmp_path / "b", {"optimizer.lr": 1e-4, "seed": 7, "data.root": "/x"}, 0.5
    )
    c = copy_run(tiny_run32, tmp_path / "c")
    return [a, b, c]


def test_a_row_per_run_and_stage_with_the_settings_that_differ(three, capsys):
    status, out, _ = compare(capsys, *three)
    assert status == 0
    rows = markdown_rows(out)
    # the settings in the config's order; paths.output_dir, data.root (and equal ones) left out
    # and the lr each stage trained at (run.json's plan: the cut into FCN-16s)
    assert list(rows[0]) == ["run", "stage", "seed", "arch.name", "optimizer.lr", "stage lr", *TITLES]  # fmt: skip
    plans = [json.loads((run / "run.json").read_text())["stages"] for run in three]
    assert [float(r["stage lr"]) for r in rows] == [plans[i][s]["lr"] for i, s in [(0, "fcn32s"), (0, "fcn16s"), (1, "fcn32s"), (1, "fcn16s"), (2, "fcn32s")]]  # fmt: skip
    settings = [(r["arch.name"], r["optimizer.lr"], r["seed"]) for r in rows]
    assert settings == [("fcn16s", "0.001", "1337")] * 2 + [("fcn16s", "0.0001", "7")] * 2 + [("fcn32s", "0.001", "1337")]  # fmt: skip
    shown = [{k: r[k] for k in ["run", "stage", *TITLES]} for r in rows]
    assert shown == [*expected(three[0], "a"), *expected(three[1], "b"), *expected(three[2], "c")]


def test_csv_and_json_hold_the_same_table(three, capsys, tmp_path):
    table = markdown_rows(compare(capsys, *three)[1])
    status, text, _ = compare(capsys, *three, "--format", "csv")
    as_csv = pd.read_csv(io.StringIO(text))
    assert status == 0 and compare(capsys, *three, "--output", tmp_path / "t.json") == (0, "", "")
    as_json = json.loads((tmp_path / "t.json").read_text())  # the format from the suffix
    assert list(as_csv.columns) == list(table[0]) == list(as_json[0])
    for got in (as_csv.to_dict("records"), as_json):
        assert [(r["run"], r["stage"], r["arch.name"]) for r in got] == [(r["run"], r["stage"], r["arch.name"]) for r in table]  # fmt: skip
        for column in ("optimizer.lr", "seed", *TITLES):
            assert [r[column] for r in got] == [float(r[column]) for r in table], column
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "t.json"]  # fmt: skip


def test_per_class_columns_are_named_by_class(three, capsys):
    status, text, _ = compare(capsys, "--per-class", "--format", "json", *three[:2])
    rows = json.loads(text)
    classes = json.loads((three[0] / "metrics.json").read_text())["fcn32s"]["per_class_IoU"]
    assert status == 0 and list(rows[0])[-len(classes) :] == [f"IoU {c}" for c in classes]
    for run, row in zip([three[0], three[0], three[1], three[1]], rows, strict=True):
        block = json.loads((run / "metrics.json").read_text())[row["stage"]]
        assert {c: row[f"IoU {c}"] for c in classes} == {c: round(100 * v, 1) for c, v in block["per_class_IoU"].items()}  # fmt: skip
    assert "IoU background" not in json.loads(compare(capsys, "--format", "json", *three[:2])[1])[0]


def preset_paper(experiment: str) -> dict:
    config = cfg_of("config", [f"experiment={experiment}", "data.root=/d"])
    return OmegaConf.to_container(config.paper)


def test_the_paper_number_beside_a_run_of_a_preset_that_gives_one(tiny_run, tmp_path, capsys):
    voc = copy_run(tiny_run[0], tmp_path / "voc", {"paper": preset_paper("voc_fcn8s_staged")})
    plain = copy_run(tiny_run[0], tmp_path / "plain")
    two = copy_run(tiny_run[0], tmp_path / "sift", {"paper": preset_paper("siftflow_16s")})
    metrics = json.loads((two / "metrics.json").read_text())
    (two / "metrics.json").write_text(
        json.dumps({"fcn16s": {"sem": metrics["fcn16s"], "geo": metrics["fcn32s"]}})
    )
    status, text, _ = compare(capsys, "--format", "json", voc, plain, two)
    rows = {(r["run"], r["stage"]): r for r in json.loads(text)}
    assert status == 0 and list(rows) == [("voc", "fcn32s"), ("voc", "fcn16s"), ("plain", "fcn32s"), ("plain", "fcn16s"), ("sift", "fcn16s/sem"), ("sift", "fcn16s/geo")]  # fmt: skip
    papers = {k: {t: r.get(f"paper {t}") for t in TITLES} for k, r in rows.items()}
    assert papers[("voc", "fcn32s")] == dict(zip(TITLES, [59.4, 89.1, 73.3, 81.4], strict=True))
    assert papers[("voc", "fcn16s")] == dict(zip(TITLES, [62.4, 90.0, 75.7, 83.0], strict=True))
    assert papers[("plain", "fcn16s")] == dict.fromkeys(TITLES)
    assert papers[("sift", "fcn16s/sem")] == dict(zip(TITLES, [39.5, 85.2, 51.7, 76.1], strict=True))  # fmt: skip
    assert papers[("sift", "fcn16s/geo")] == {**dict.fromkeys(TITLES), "pixel acc": 94.3}
    assert rows[("sift", "fcn16s/geo")]["mIoU %"] == round(100 * metrics["fcn32s"]["mIoU"], 1)
    assert not [k for k in rows[("voc", "fcn32s")] if k.startswith("paper.")]  # not a setting


def test_a_run_without_metrics_is_listed_with_its_status(three, capsys):
    failed = three[2]
    (failed / "metrics.json").unlink()
    record = json.loads((failed / "run.json").read_text())
    (failed / "run.json").write_text(json.dumps(record | {"status": "failed", "reason": "boom"}))
    rows = markdown_rows(compare(capsys, *three)[1])
    assert [(r["run"], r["stage"], r["status"]) for r in rows][-2:] == [("b", "fcn16s", "finished"), ("c", "", "failed")]  # fmt: skip
    assert [rows[-1][t] for t in TITLES] == [""] * 4 and rows[-1]["arch.name"] == "fcn32s"


def test_bad_paths_are_named(tmp_path, tiny_run32, capsys):
    missing = tmp_path / "missing"
    done = subprocess.run([sys.executable, "-m", "fcn_lightning.compare", str(missing)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"Error: {missing}: no such folder\n"
    (tmp_path / "empty").mkdir()
    status, out, err = compare(capsys, tmp_path / "empty")
    assert status == 1 and out == ""
    assert err.startswith(f"Error: {tmp_path / 'empty'}: no run in it")
    broken = copy_run(tiny_run32, tmp_path / "broken")
    (broken / "metrics.json").write_text('{"fcn32s": ')
    status, out, err = compare(capsys, broken)
    assert status == 1 and out == ""
    assert err.startswith(f"Error: {broken / 'metrics.json'} is unreadable")
    target = tmp_path / "no" / "t.md"
    status, _, err = compare(capsys, tiny_run32, "--output", target)
    assert status == 1 and err == f"Error: --output {target}: cannot write it (No such file or directory)\n"  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real two-point sweep (-m) of tiny FCN-32s runs."""
    root = tmp_path_factory.mktemp("sweep")
    done = cli("-m", *TINY, "arch=fcn32s", "optimizer.lr=1e-3,1e-4",
               f"hydra.sweep.dir={root}", cwd=root)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return root


def test_a_sweep_folder_expands_to_its_jobs(sweep, capsys, tmp_path):
    jobs = find_runs([str(sweep)])
    assert len(jobs) == 2 and all((j / "metrics.json").is_file() for j in jobs)
    assert find_runs([f"{sweep}/*"]) == jobs  # a glob: its folders (not summary.txt, ...)
    status, out, _ = compare(capsys, sweep, "--plot", tmp_path / "curves.png")
    rows = markdown_rows(out)
    assert status == 0 and list(rows[0]) == ["run", "stage", "optimizer.lr", *TITLES]
    assert [r["optimizer.lr"] for r in rows] == ["0.001", "0.0001"]
    assert rows == [e | {"optimizer.lr": lr} for j, lr in zip(jobs, ["0.001", "0.0001"], strict=True) for e in expected(j, j.name)]  # fmt: skip
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_has_a_line_per_run_and_stage(sweep, tiny_run, tmp_path):
    as_sweep = {"images.every_n_epochs": 0}  # the one setting tiny_run's figures add
    staged = copy_run(tiny_run[0], tmp_path / "staged", as_sweep)
    csv_run = copy_run(tiny_run[0], tmp_path / "csvrun", {"arch.name": "fcn32s", **as_sweep})
    shutil.rmtree(csv_run / "tensorboard")  # the csv logger's file instead
    (csv_run / "csv" / "fcn32s").mkdir(parents=True)
    (csv_run / "csv" / "fcn32s" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/mIoU,val/pixel_acc\n0,0,1.5,,\n0,0,,0.25,0.7\n1,1,,0.5,0.8\n"
    )
    shutil.copytree(sweep, tmp_path / "sweep", ignore=shutil.ignore_patterns("*.ckpt"))
    runs = [read_run(f) for f in [*find_runs([str(tmp_path / "sweep")]), staged, csv_run]]
    ax = plot(runs).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    jobs = [j.name for j in find_runs([str(sweep)])]
    assert len(ax.get_lines()) == 5 and sorted(lines) == sorted([
        f"sweep/{jobs[0]} fcn32s: arch.name=fcn32s, optimizer.lr=0.001",
        f"sweep/{jobs[1]} fcn32s: arch.name=fcn32s, optimizer.lr=0.0001",
        "staged fcn32s: arch.name=fcn16s, optimizer.lr=0.001",
        "staged fcn16s: arch.name=fcn16s, optimizer.lr=0.001",
        "csvrun fcn32s: arch.name=fcn32s, optimizer.lr=0.001",
    ])  # fmt: skip
    csv_line = lines["csvrun fcn32s: arch.name=fcn32s, optimizer.lr=0.001"]
    assert list(csv_line.get_xdata()) == [0, 1] and list(csv_line.get_ydata()) == [25.0, 50.0]
    final = json.loads((staged / "metrics.json").read_text())["fcn16s"]["mIoU"]
    board_line = lines["staged fcn16s: arch.name=fcn16s, optimizer.lr=0.001"]
    assert board_line.get_ydata()[-1] == pytest.approx(100 * final)
    # a run's stages one after another on the step axis, not on top of each other
    first = lines["staged fcn32s: arch.name=fcn16s, optimizer.lr=0.001"]
    assert min(board_line.get_xdata()) > max(first.get_xdata())


def test_what_a_stage_trained_with_shows_and_what_trained_nothing_is_left_out(three, capsys):
    # a run resumed with a larger budget: its config still says the first one, its scored
    # checkpoint the step it trained to
    a, b, c = three
    metrics = json.loads((b / "metrics.json").read_text())
    metrics["fcn16s"]["checkpoint"]["step"] = 40
    (b / "metrics.json").write_text(json.dumps(metrics))
    # a run refused before any stage (a typo), and an eval.py folder beside the runs
    refused = a.parent / "refused"
    refused.mkdir()
    (refused / "run.json").write_text(json.dumps({"status": "failed", "reason": "ConfigError: optimizer.lrr is not a setting\nmore", "config": {"optimizer": {"lrr": 1}}, "stages": {}}))  # fmt: skip
    (a.parent / "eval" / ".hydra").mkdir(parents=True)
    (a.parent / "eval" / "eval.json").write_text("{}")
    status, out, err = compare(capsys, a.parent)
    rows = markdown_rows(out)
    assert status == 0 and [r["run"] for r in rows] == ["a", "a", "b", "b", "c"]
    assert [r["stage step"] for r in rows] == ["1", "1", "1", "40", "1"]
    assert "optimizer.lrr" not in rows[0]  # the refused run's settings make no column
    assert err == f"left out {refused}: failed before training (ConfigError: optimizer.lrr is not a setting)\n"  # fmt: skip
    shutil.rmtree(a), shutil.rmtree(b), shutil.rmtree(c)
    assert compare(capsys, a.parent) == (1, "", "left out " + str(refused) + ": failed before training (ConfigError: optimizer.lrr is not a setting)\nError: no run trained a stage: nothing to compare\n")  # fmt: skip


def test_a_setting_taken_from_another_is_shown_by_its_value(tmp_path):
    # the from-scratch recipes set arch.backbone=${arch.scratch_backbone}; ${hydra:...} needs Hydra
    runs = []
    for name, backbone in (("a", "${arch.scratch_backbone}"), ("b", "vgg16")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text(
            f"seed: {len(runs)}\ndata: {{loader_seed: '${{seed}}'}}\npaths: {{out: '${{hydra:runtime.output_dir}}'}}\n"
            f"arch: {{backbone: '{backbone}', scratch_backbone: resnet50}}\n"
        )
        runs.append(read_run(tmp_path / name))
    assert [r.settings["arch.backbone"] for r in runs] == ["resnet50", "vgg16"]
    assert differing(runs) == ["seed", "arch.backbone"]  # data.loader_seed: a copy of seed
