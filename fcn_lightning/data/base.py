"""The base of the DataModules (docs/DATA.md): a sample is a normalised float (C, H, W) image and
``{head: int64 (H, W) labels}``, 255 = ignore (:mod:`..contract`); the seeded, resumable training
order (docs/ARCHITECTURE.md, "Resuming exactly"), the loaders and their padding collate."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors

from ..contract import IGNORE_INDEX, SINGLE_HEAD, DataContract, Head
from ..errors import DataError
from ..normalization import Normalization, group_normalizations
from .labelcheck import LabelReport, run_label_check
from .readers import check_label, map_labels
from .transforms import eval_transforms, train_transforms

Sample = tuple[torch.Tensor, dict[str, torch.Tensor]]  # an image and its labels by head
BATCHING = ("crop", "pad", "whole")
AUTO_WORKERS = 4  # data.num_workers=auto: this many loader processes, at most one per core
TURNED = (
    ": turned by 90 degrees. Was the mask drawn on the photo as a viewer shows it (EXIF "
    "orientation)? Training reads the stored pixels: save the photo turned "
    "(PIL.ImageOps.exif_transpose), or the mask to match the stored image"
)


class SegmentationDataset(Dataset):
    """Samples ``(image, {head: int64 labels})`` of ``ids``, read by ``load(id)``; the labels
    mapped by ``label_map``, then checked against ``num_classes`` and the image's size."""

    def __init__(
        self,
        ids: Sequence[Any],
        load: Callable[[Any], tuple[torch.Tensor, dict[str, Any], str]],
        num_classes: dict[str, int],
        transforms: Callable,
        label_map: dict[int, int] | None = None,
    ) -> None:
        self.ids, self.load, self.transforms = list(ids), load, transforms
        self.num_classes, self.label_map = num_classes, label_map

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        image, labels, where = self.load(self.ids[index])
        masks = {}
        for head, lab in labels.items():
            lab = check_label(map_labels(lab, self.label_map), self.num_classes[head], where)
            if (shape := tuple(lab.shape)) != (size := tuple(image.shape[-2:])):
                hint = TURNED if shape == size[::-1] else ""
                raise DataError(f"{where}: label is {shape} (H, W) but its image is {size}{hint}")
            masks[head] = tv_tensors.Mask(lab)
        image, masks = self.transforms(tv_tensors.Image(image), masks)
        masks = {k: m.as_subclass(torch.Tensor).long() for k, m in masks.items()}
        return image.as_subclass(torch.Tensor), masks


class ResumableSampler(Sampler):
    """Shuffles by (seed, epoch) and yields ``(epoch, index)``, so that a restart sees the same
    order and transforms; ``resume_at(epoch, n)`` skips the first ``n`` samples of that epoch."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        self._skip = (epoch, samples_done)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self._skip is not None and self._skip[0] == self.epoch:
            order, self._skip = order[self._skip[1] :], None
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        # a whole epoch even while resuming: Lightning counts an epoch's batches once, from the
        # first loader, so a shorter length would shorten every epoch
        return self.size


class SeededDataset(Dataset):
    """Training samples whose random transforms depend only on (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int):
        # an int: Lightning's own sequential sampler in place of ours (trainer.overfit_batches)
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


def pad_collate(batch: list[Sample]) -> Sample:
    """Pad every sample to the largest in the batch: image with 0, labels with 255 (ignored)."""
    h, w = (max(img.shape[d] for img, _ in batch) for d in (-2, -1))

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), value=value)

    labels = {k: torch.stack([pad(t[k], IGNORE_INDEX) for _, t in batch]) for k in batch[0][1]}
    return torch.stack([pad(img, 0) for img, _ in batch]), labels


def loader_workers(setting: int | str) -> int:
    """``data.num_workers``: a count, or ``auto``: :data:`AUTO_WORKERS`, but no more than the
    cores this process may use (PyTorch warns about more, and they only compete)."""
    if setting == "auto":
        linux = hasattr(os, "sched_getaffinity")
        return min(AUTO_WORKERS, len(os.sched_getaffinity(0)) if linux else os.cpu_count() or 1)
    try:
        workers = -1 if isinstance(setting, bool) else int(setting)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0:
        raise ValueError(f"data.num_workers must be auto or a count >= 0, got {setting!r}")
    return workers


class SegmentationDataModule(pl.LightningDataModule):
    """Base DataModule: loaders, batching and transforms; subclasses say where samples come from
    (``make_dataset``, ``label_files``, ``read_label``). Its defaults are
    ``conf/base/data.yaml``'s, the paper's; the settings: docs/CONFIG.md."""

    class_names: tuple[str, ...] = ()  # a one-head dataset's classes, index 0 first
    palette: Sequence[tuple[int, int, int]] = ()  # their colours; none: the VOC palette

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        batch_size: int = 1,
        val_batch_size: int = 1,
        num_workers: int | str = "auto",
        pin_memory: bool = True,
        persistent_workers: bool = True,
        batching: str = "whole",
        crop_size: int | Sequence[int] | None = None,
        scale_range: Sequence[float] | None = None,
        scale_short_side: int | None = None,
        hflip: bool = False,
        normalization: str | dict | list = "imagenet",
        loader_seed: int | None = 0,
        label_map: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        if batching not in BATCHING:
            raise ValueError(f"data.batching must be one of {BATCHING}, got {batching!r}")
        if batching == "whole" and batch_size != 1:
            raise ValueError(
                "data.batching=whole trains on whole images one at a time: set data.batch_size=1 "
                f"(got {batch_size})"
            )
        if batching == "crop" and not crop_size:
            raise ValueError("data.batching=crop needs data.crop_size")
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(
                "data.batch_size and data.val_batch_size must be >= 1, got "
                f"{batch_size}, {val_batch_size}"
            )
        self.root = Path(root).expanduser() if root is not None else None
        self.train_split, self.val_split = train_split, val_split
        self.test_split = test_split or val_split
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = loader_workers(num_workers), pin_memory
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.batching, self.crop_size, self.scale_range = batching, crop_size, scale_range
        self.hflip, self.normalization = hflip, normalization
        self.scale_short_side = scale_short_side
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.datasets: dict[str, Dataset] = {}
        # the shuffling order and per-sample transforms of training depend on this seed only
        self.loader_seed = int(torch.initial_seed() % 2**31 if loader_seed is None else loader_seed)
        self._resume: dict[str, int] | None = None
        self._said: set[str] = set()

    def warn_once(self, message: str) -> None:
        """A warning about the data, once per DataModule (each stage lists the splits again)."""
        if message not in self._said:
            self._said.add(message)
            warnings.warn(message, stacklevel=3)

    # --- where training stopped, saved in every checkpoint, for an exact mid-epoch resume
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done == 0:
            return {}  # the epoch starts from its beginning
        # after an epoch's last batch too: a run stopped there (Ctrl+C, a step checkpoint) is
        # resumed by Lightning into that epoch, which must then give no batch, not start over
        samples = done * self.batch_size * trainer.world_size  # this epoch, all processes
        return {"epoch": trainer.current_epoch, "samples_done": samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = getattr(self, "trainer", None)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        self._resume = dict(state) if state and fitting else None

    @property
    def contract(self) -> DataContract:
        """What this DataModule gives: one head of ``class_names`` in ``palette``, a photo."""
        return DataContract({SINGLE_HEAD: Head(self.class_names, self.palette)}, [("rgb", "voc")])

    @property
    def input_normalizations(self) -> tuple[Normalization, ...]:
        """The normalisation of each image group of the contract: what a model records."""
        return group_normalizations(self.normalization, self.contract.image_inputs)

    def make_dataset(self, split: str, transforms: Callable) -> Dataset:
        raise NotImplementedError  # the samples of a split: what self.dataset gives

    def dataset(
        self, ids: Sequence[Any], load: Callable, transforms: Callable, name: str
    ) -> SegmentationDataset:
        """What ``make_dataset`` returns: the samples of ``ids``, checked against the contract;
        ``name``: the split's, for the error when it is empty."""
        if not ids:
            raise DataError(f"{name} is empty: its split lists no images")
        return SegmentationDataset(ids, load, self.contract.num_classes, transforms, self.label_map)

    def label_files(self, split: str) -> list[dict[str, Path]]:
        raise NotImplementedError  # the label file of each sample of a split, by head

    @staticmethod
    def read_label(path: Path, head: str = SINGLE_HEAD) -> np.ndarray:
        """Class indices (255 = ignore) of one label file before ``label_map``, as training reads
        it; a staticmethod, so that the label check's loader workers can be sent it."""
        raise NotImplementedError

    def check_labels(
        self, splits: Sequence[str] | None = None, *, workers: int | None = None
    ) -> LabelReport:
        """The label files of ``splits`` (default: train, val, test) read and counted."""
        return run_label_check(self, splits, workers=workers)

    def train_transforms(self) -> Callable:
        return train_transforms(
            crop_size=self.crop_size if self.batching == "crop" else None,
            scale_range=self.scale_range,
            scale_short_side=self.scale_short_side,
            hflip=self.hflip,
            normalization=list(self.input_normalizations),
            image_groups=self.contract.image_groups,
        )

    def eval_transforms(self) -> Callable:
        return eval_transforms(
            normalization=list(self.input_normalizations), image_groups=self.contract.image_groups
        )

    def setup(self, stage: str | None = None) -> None:
        val, test = ("val", self.val_split, False), ("test", self.test_split, False)
        wanted = {"validate": [val], "test": [test], "predict": [test]}
        for key, split, train in wanted.get(stage, [("train", self.train_split, True), val]):
            if key not in self.datasets:
                transforms = self.train_transforms() if train else self.eval_transforms()
                self.datasets[key] = self.make_dataset(split, transforms)

    def split_ids(self, split: str) -> list[Any]:
        """The ids ``split`` lists, as its dataset reads them."""
        return list(self.make_dataset(split, lambda *sample: sample).ids)

    def image_ids(self, split: str) -> set[str]:
        """The photos ``split`` holds, by id (a ``(source, id)`` pair: the id; VOC's and SBD's
        copy of a photo are one photo): two splits share an image where they share an id."""
        return {str(i[-1] if isinstance(i, tuple) else i) for i in self.split_ids(split)}

    def _loader(self, key: str) -> DataLoader:
        if key not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[key])
        dataset, sampler = self.datasets[key], None
        batch_size, collate = self.val_batch_size, pad_collate  # whole images, padded
        if key == "train":
            batch_size, collate = self.batch_size, pad_collate if self.batching == "pad" else None
            sampler = ResumableSampler(len(dataset), self.loader_seed)
            trainer = getattr(self, "trainer", None)
            if trainer is not None:  # a resumed fit draws its first batches before Lightning's
                sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)  # set_epoch
            if self._resume:
                sampler.resume_at(self._resume["epoch"], self._resume["samples_done"])
                self._resume = None
            dataset = SeededDataset(dataset, self.loader_seed)
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every sample exactly once across processes: no padding with repeated samples
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # its own generator: creating an iterator must not draw from the global random state
            generator=torch.Generator().manual_seed(self.loader_seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:  # FCNModule.predict_step: the test split
        return self._loader("test")


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_split_file(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"split list not found: {path} ({what})")
    if not (ids := read_lines(path)):
        raise DataError(f"split list {path} is empty")
    return ids


def check_files_exist(ids: Sequence, paths: Callable[..., Sequence[Path]], split: str) -> None:
    """Fail at setup, not hours into an epoch, when a split names an id without its files."""
    for i in ids:
        if missing := next((p for p in paths(i) if not p.is_file()), None):
            name = i[-1] if isinstance(i, tuple) else i
            raise DataError(f"split '{split}' lists '{name}' but {missing} does not exist")
