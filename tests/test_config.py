"""Config composition: a group chosen on the command line always wins over a data set's recipe,
and every pair of the groups' options gives a config that builds its model, solver and schedule."""

from __future__ import annotations

import copy
import functools
import itertools
from types import SimpleNamespace

import pytest
import torch
from helpers import CONF, cfg_of
from hydra import compose, initialize_config_dir
from hydra._internal.config_repository import ConfigRepository
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fcn_lightning.app.checks import check_settings
from fcn_lightning.app.common import make_datamodule
from fcn_lightning.app.stages import stages_for
from fcn_lightning.app.train import make_module

DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
ARCHS = sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))
TORCH_OPTIMIZER = {"sgd": torch.optim.SGD, "sgd_heavy": torch.optim.SGD, "adamw": torch.optim.AdamW}
TORCH_OPTIMIZER["adamw_scratch"] = torch.optim.AdamW


def test_every_group_option_is_covered():
    assert set(DATA) == {"folder", "nyud", "siftflow", "synthetic", "voc"}
    assert set(OPTIMIZERS) == set(TORCH_OPTIMIZER)
    assert len(SCHEDULERS) == 3 and len(ARCHS) == 5


@pytest.fixture
def files_read_once(monkeypatch):
    """Hydra reads and parses each config file once for a test's many compositions, not once per
    composition (a third of a composition's time); every composition gets a deep copy of what was
    read, as from a fresh read, and runs every other step of its composing as always."""
    load = ConfigRepository.load_config
    read: dict[tuple, object] = {}

    def load_once(self, config_path):
        key = (tuple(source.path for source in self.get_sources()), config_path)
        if key not in read:
            read[key] = load(self, config_path)
        return copy.deepcopy(read[key])

    monkeypatch.setattr(ConfigRepository, "load_config", load_once)


def combinations(data: str) -> list[tuple[str, str, str]]:
    """Every optimizer and scheduler with the data set, the arch in turn: across the data sets,
    every pair of options of any two groups is composed (an arch sets no solver setting, a
    data set's recipe does)."""
    pairs = itertools.product(OPTIMIZERS, SCHEDULERS)
    turn = DATA.index(data)
    return [(o, s, ARCHS[(i + turn) % len(ARCHS)]) for i, (o, s) in enumerate(pairs)]


def test_the_combinations_cover_every_pair_of_options():
    combos = [(d, *c) for d in DATA for c in combinations(d)]
    groups = (DATA, OPTIMIZERS, SCHEDULERS, ARCHS)
    for a, b in itertools.combinations(range(4), 2):
        assert {(c[a], c[b]) for c in combos} == set(itertools.product(groups[a], groups[b]))


@pytest.mark.parametrize("data", DATA)
def test_every_combination_composes_and_builds(data, files_read_once):
    # data needs no files here: the model's classes and channels come from the DataModule's
    # settings; tiny width keeps the models cheap
    for optimizer, scheduler, arch in combinations(data):
        combo = f"data={data} optimizer={optimizer} scheduler={scheduler} arch={arch}"
        cfg = cfg_of(
            "config",
            [
                f"data={data}",
                f"optimizer={optimizer}",
                f"scheduler={scheduler}",
                f"arch={arch}",
                "data.root=/nowhere",
                "arch.width=0.0625",
                "arch.pretrained=null",
                "++force_from_scratch=true",  # the plain trunks with SGD: builds, not a recipe
                "+data.num_classes=3" if data == "folder" else "data.batch_size=1",
            ],
        )
        # the command-line choice wins, whole: no key of another optimizer leaks in
        assert cfg.optimizer.name == {"sgd_heavy": "sgd", "adamw_scratch": "adamw"}.get(
            optimizer, optimizer
        ), combo
        assert cfg.scheduler.name == scheduler and cfg.arch.name == arch, combo
        check_settings(cfg)
        dm = make_datamodule(cfg.data)
        stage = stages_for(cfg)[-1]
        module = make_module(cfg, dm, stage, float(cfg.optimizer.lr), None)
        module.trainer = SimpleNamespace(estimated_stepping_batches=100)
        solver = module.configure_optimizers()
        opt = solver["optimizer"] if isinstance(solver, dict) else solver
        assert type(opt) is TORCH_OPTIMIZER[optimizer], combo
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr), combo
        if scheduler != "fixed":
            assert isinstance(solver, dict) and "lr_scheduler" in solver, combo


def test_recipes_choose_groups_the_command_line_can_replace():
    assert cfg_of("config", ["data=voc", "data.root=/d"]).optimizer.momentum == 0.9
    heavy = cfg_of("config", ["data=nyud", "data.root=/d"])
    assert heavy.optimizer.lr == 1e-10 and heavy.optimizer.momentum == 0.99
    assert heavy.loss.reduction == "sum"
    mine = cfg_of("config", ["data=voc", "data.root=/d", "optimizer=adamw"])
    assert mine.optimizer.name == "adamw" and "momentum" not in mine.optimizer
    mine = cfg_of("config", ["experiment=voc_fcn8s_heavy", "data.root=/d", "optimizer=adamw"])
    assert mine.optimizer.name == "adamw" and "momentum" not in mine.optimizer
    # the paper's NYUDv2 recipe as the README gives it
    cfg = cfg_of("config", ["arch=fcn16s", "data=nyud", "data.root=/d"])
    assert stages_for(cfg) == ["fcn32s", "fcn16s"] and cfg.optimizer.name == "sgd"


def test_a_summed_loss_with_a_mean_loss_lr_warns(caplog):
    cfg = cfg_of("config", ["data=nyud", "data.root=/d", "optimizer=adamw"])
    with caplog.at_level("WARNING", logger="fcn_lightning"):
        check_settings(cfg)
    assert "loss.reduction=sum" in caplog.text and "loss.reduction=mean" in caplog.text


# command-line keys that each set a value some recipe sets
RECIPE_KEYS = ["optimizer.lr=0.5", "trainer.max_steps=7", "trainer.max_epochs=3"]
RECIPE_KEYS += ["stages.fcn16s.lr_factor=0.3", "stages.fcn32s.max_steps=9"]
RECIPE_KEYS += ["loss.reduction=mean", "arch.width=0.5"]


def leaves(node, prefix=""):
    """(dotted key, value) of every value in a plain dict, nested keys joined with dots."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def recipe_of(data):
    """The recipe file's optimizer choice and its values."""
    recipe = OmegaConf.to_container(OmegaConf.load(CONF / "recipe" / f"{data}.yaml"))
    (choice,) = [d["/optimizer"] for d in recipe.pop("defaults")]
    return choice, recipe


def test_each_data_set_has_one_recipe_and_none_switches_it_off():
    # and recipe=scratch, chosen by hand for any data set
    assert {p.stem for p in (CONF / "recipe").glob("*.yaml")} == {*DATA, "none", "scratch"}
    plain = cfg_of("config", ["recipe=none"])
    assert plain.optimizer == OmegaConf.load(CONF / "optimizer" / "sgd.yaml")
    assert plain.trainer == OmegaConf.load(CONF / "trainer" / "default.yaml")


@pytest.mark.parametrize("data", DATA)
def test_a_data_config_alone_sets_no_key_outside_data(data):
    plain = cfg_of("config", ["recipe=none"])
    cfg = cfg_of("config", [f"data={data}", "data.root=/d", "recipe=none"])
    assert set(cfg) == set(plain)
    for key in set(cfg) - {"data"}:
        assert cfg[key] == plain[key], (data, key)
    assert cfg.data.normalization == cfg.arch.normalization  # the link lives in config.yaml
    evaluation = cfg_of("eval", ["ckpt_path=x", f"data={data}", "data.root=/d"])
    assert "optimizer" not in evaluation and "arch" not in evaluation  # the checkpoint has them


@pytest.mark.parametrize("data", DATA)
def test_data_applies_its_recipe(data):
    choice, recipe = recipe_of(data)
    cfg = cfg_of("config", [f"data={data}", "data.root=/d"])
    expected = cfg_of("config", ["recipe=none", f"optimizer={choice}"]).optimizer
    expected.merge_with(recipe.get("optimizer", {}))
    assert cfg.optimizer == expected, data
    for key, value in leaves(recipe):
        raw = functools.reduce(lambda d, k: d[k], key.split("."), OmegaConf.to_container(cfg))
        assert raw == value, (data, key)  # as the recipe writes it (interpolations unresolved)


@pytest.mark.parametrize("data", DATA)
def test_the_command_line_beats_the_recipe(data):
    choice, _ = recipe_of(data)
    for optimizer in set(OPTIMIZERS) - {choice}:
        cfg = cfg_of("config", [f"data={data}", "data.root=/d", f"optimizer={optimizer}"])
        alone = cfg_of("config", ["recipe=none", f"optimizer={optimizer}"]).optimizer
        assert cfg.optimizer == alone, (data, optimizer)  # the whole group, its own values
    cfg = cfg_of("config", [f"data={data}", "data.root=/d", *RECIPE_KEYS])
    for override in RECIPE_KEYS:
        key, value = override.split("=")
        assert str(OmegaConf.select(cfg, key)) == value, (data, key)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_an_experiment_brings_the_recipe_of_its_data(experiment):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", [f"experiment={experiment}", "data.root=/d"], return_hydra_config=True
        )
    assert cfg.hydra.runtime.choices.recipe == cfg.hydra.runtime.choices.data


def test_the_archs_share_all_but_their_name():
    archs = {
        a: OmegaConf.to_container(cfg_of("config", [f"arch={a}", "recipe=none"]).arch)
        for a in ARCHS
    }
    assert {a.pop("name") for a in archs.values()} == set(ARCHS)
    paper = [a for name, a in archs.items() if name != "fcn_torchvision"]
    assert all(a == paper[0] for a in paper)
    # torchvision's net: its backbone, stride, geometry, dropout and auxiliary head, the rest shared
    torchvision = {"backbone": "resnet50", "scratch_backbone": "resnet50", "output_stride": 8,
                   "geometry": "same", "dropout": 0.0, "aux_weight": 0.5}  # fmt: skip
    assert archs["fcn_torchvision"] == {**paper[0], **torchvision}
