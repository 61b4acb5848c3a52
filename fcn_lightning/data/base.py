"""Common base of the segmentation datasets and DataModules.

A sample is ``(image, target)``: a float tensor (C, H, W) normalised for the model, and an int64
label map (H, W) with 255 = ignore (a dict of label maps for multi-head datasets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import scipy.io
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors

from .transforms import IGNORE_INDEX, eval_transforms, train_transforms

if TYPE_CHECKING:
    from .labelcheck import LabelReport

BATCHING = ("crop", "pad", "whole")


class DataError(ValueError):
    """A dataset on disk does not match what the loader expects; the message names the file."""


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), the de facto segmentation palette."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def read_image(path: Path, mode: str = "RGB", exif_transpose: bool = False) -> torch.Tensor:
    """Decode an image file to a uint8 (C, H, W) tensor, ``mode`` 'RGB' (3 channels) or 'L' (1).

    Every common PIL mode keeps its true brightness, where ``Image.convert`` would clip:

    - 16-bit greyscale ('I;16', 'I;16B', ...) is scaled by the range of its type, 65535 -> 255,
      never stretched per image: a 12-bit image stored in 16 bits comes out dark but faithful,
      and one scene looks the same in every file. 'I' (32-bit) is read as 16-bit when its values
      fit 0..65535 (older Pillow opens 16-bit PNGs so), else by the int32 range; 'F' as 0..1
      when its values fit, else as 0..255 (clipped). Pillow opens 16-bit RGB PNGs as 8-bit RGB
      (their high byte), the same scaling.
    - Alpha ('RGBA', 'LA', 'PA', palette transparency) is dropped, not composited: the stored
      colours stay, as the labels were drawn on them.
    - 'P' gives its palette colours, 'CMYK' (JPEG) Pillow's CMYK -> RGB, '1' black and white.

    ``exif_transpose`` turns the image as its EXIF orientation says (photos from phones, for
    prediction); training leaves it off, since labels are drawn on the stored pixels. A missing,
    corrupt or truncated file raises DataError naming it.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"read_image: mode must be 'RGB' or 'L', got {mode!r}")
    try:
        with Image.open(path) as img:
            array = _decode(ImageOps.exif_transpose(img) if exif_transpose else img)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as err:
        raise DataError(f"cannot decode image {path}: {err}") from err
    if mode == "L" and array.ndim == 3:
        array = np.array(Image.fromarray(array).convert("L"))
    elif mode == "RGB" and array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _decode(img: Image.Image) -> np.ndarray:
    """uint8 pixels of any PIL mode: (H, W) for greyscale sources, (H, W, 3) for colour."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img)
        top = float(values.max(initial=0))
        if img.mode == "F":
            top = 1.0 if top <= 1.0 else 255.0
        elif img.mode == "I":
            top = 65535.0 if top <= 65535 else float(np.iinfo(np.int32).max)
        else:
            top = 65535.0
        return np.clip(np.rint(values.astype(np.float32) * (255 / top)), 0, 255).astype(np.uint8)
    if img.mode in ("1", "L", "LA", "La"):
        return np.array(img.convert("L"))  # '1' -> 0 / 255; alpha dropped
    if img.mode in ("P", "PA"):
        return np.array(img.convert("RGBA"))[..., :3]  # palette colours; transparency dropped
    return np.array(img.convert("RGB"))  # RGB, RGBA/RGBX (alpha dropped), CMYK, YCbCr


LABEL_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


def read_label_png(path: Path) -> np.ndarray:
    """uint8 class indices of a label PNG: palette ('P'), 8-bit ('L'), 1-bit ('1': 0 / 1) or
    16-bit ('I;16', 'I') whose values stay within 0..255. A larger 16-bit value is refused, never
    wrapped modulo 256 into some other class; colour (RGB) labels are refused too: their pixels
    are colours, not class indices."""
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise DataError(_colour_label_message(path, img))
            label = np.asarray(img)
            mode = img.mode
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read label {path}: {err}") from err
    if label.dtype != np.uint8:
        wide = (label < 0) | (label > 255)
        if wide.any():
            found = np.unique(label[wide])[:8].tolist()
            raise DataError(
                f"label {path} is a {mode} image with values {found} above 255: class indices "
                "must be 0..254 (255 = ignore); with more classes than that, split the labels"
            )
        label = label.astype(np.uint8)
    return label


def _colour_label_message(path: Path, img: Image.Image) -> str:
    message = (
        f"label {path} is a {img.mode} image; labels must be palette (P) or single-channel index "
        "PNGs whose pixel values are class indices (255 = ignore). "
    )
    rgb = np.asarray(img.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return message + "Its channels are equal: Image.open(p).convert('L').save(p) converts it"
    return message + (
        "To convert a colour-coded mask, give each colour its class: "
        "index[(rgb == colour).all(-1)] = class, then Image.fromarray(index).save(p) "
        "with index a uint8 array"
    )


def read_mat(path: Path, key: str, what: str) -> np.ndarray:
    """``scipy.io.loadmat(path)[key]``; a missing file, unreadable file or missing key names itself."""
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except Exception as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no '{key}' key (found {found})")
    return mat[key]


def map_labels(label: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """``label`` with each value ``k`` of ``label_map`` replaced by ``label_map[k]``, all at once
    (so ``{1: 2, 2: 1}`` swaps); run before the range check, so a bad target still fails it."""
    arr = np.asarray(label)
    if not label_map:
        return arr
    if arr.dtype == np.uint8 and all(0 <= v <= 255 for v in label_map.values()):
        lut = np.arange(256, dtype=np.uint8)
        for src, dst in label_map.items():
            if 0 <= src <= 255:
                lut[src] = dst
        return lut[arr]
    out = arr.astype(np.int64)
    for src, dst in label_map.items():
        out[arr == src] = dst
    return out


def check_label(
    label: np.ndarray | torch.Tensor, num_classes: int, path: Path | str
) -> torch.Tensor:
    """A uint8 label tensor after checking every value is in 0..num_classes-1 or 255."""
    arr = np.asarray(label)
    valid = (arr == IGNORE_INDEX) | ((arr >= 0) & (arr < num_classes))
    if not valid.all():
        found = sorted(set(np.unique(arr[~valid]).tolist()))[:8]
        raise DataError(
            f"label {path} has values {found} outside 0..{num_classes - 1} and {IGNORE_INDEX} "
            f"(num_classes={num_classes}: does the class count match the labels? "
            "data.label_map can map values, e.g. to 255 to ignore them)"
        )
    # uint8 through the transforms: nearest resizing and cropping stay cheap
    return torch.from_numpy(np.array(arr, dtype=np.uint8))


class SegmentationDataset(Dataset):
    """Samples from a list of ids and a loader for one id; maps label values by ``label_map``
    (every head alike), then checks sizes and label ranges."""

    def __init__(
        self,
        ids: Sequence[str],
        load: Callable[[str], tuple[torch.Tensor, Any, str]],
        num_classes: int | dict[str, int],
        transforms: Callable | None = None,
        name: str = "dataset",
        label_map: dict[int, int] | None = None,
    ) -> None:
        if not ids:
            raise DataError(f"{name} is empty: its split lists no images")
        self.ids, self.load, self.num_classes, self.transforms = (
            list(ids),
            load,
            num_classes,
            transforms,
        )
        self.label_map = label_map or None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image, label, where = self.load(self.ids[index])
        labels = label if isinstance(label, dict) else {"out": label}
        checked = {}
        for head, lab in labels.items():
            n = self.num_classes[head] if isinstance(self.num_classes, dict) else self.num_classes
            lab = check_label(map_labels(lab, self.label_map), n, where)
            if tuple(lab.shape) != tuple(image.shape[-2:]):
                turned = tuple(lab.shape) == tuple(image.shape[-2:])[::-1]
                raise DataError(
                    f"{where}: label is {tuple(lab.shape)} (H, W) but its image is "
                    f"{tuple(image.shape[-2:])}"
                    + (
                        ": turned by 90 degrees. Was the mask drawn on the photo as a viewer shows "
                        "it (EXIF orientation)? Training reads the stored pixels: save the photo "
                        "turned (PIL.ImageOps.exif_transpose), or the mask to match the stored image"
                        if turned
                        else ""
                    )
                )
            checked[head] = tv_tensors.Mask(lab)
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, checked = self.transforms(image, checked)
        target = checked if isinstance(label, dict) else checked["out"]
        return image.as_subclass(torch.Tensor), _plain(target)


def _plain(target):
    if isinstance(target, dict):
        return {k: v.as_subclass(torch.Tensor).long() for k, v in target.items()}
    return target.as_subclass(torch.Tensor).long()


class ResumableSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch), so an epoch's order is known again after
    a restart, and yields ``(epoch, index)`` so that each sample's random transforms are seeded
    too (see :class:`SeededDataset`). ``resume_at(epoch, n)`` skips the first ``n`` samples of
    that epoch: training resumed mid-epoch sees exactly the samples it had not seen."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        self._skip = (epoch, samples_done)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            ).tolist()
        else:
            order = list(range(self.size))
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1] :]
            self._skip = None
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        if self._skip is not None and self._skip[0] == self.epoch:
            return max(0, self.size - self._skip[1])
        return self.size


class SeededDataset(Dataset):
    """Training samples whose random transforms depend only on (seed, epoch, index), not on the
    global random state: prefetching and restarts do not change what a sample looks like."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


def pad_collate(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """Pad every sample to the largest in the batch: image with 0, labels with 255 (ignored)."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], h, w, dtype=batch[0][0].dtype)
    first = batch[0][1]
    heads = list(first) if isinstance(first, dict) else [None]
    labels = {k: torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.long) for k in heads}
    for i, (img, tgt) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        for k in heads:
            lab = tgt[k] if k is not None else tgt
            labels[k][i, : lab.shape[-2], : lab.shape[-1]] = lab
    return images, labels if isinstance(first, dict) else labels[None]


class SegmentationDataModule(pl.LightningDataModule):
    """Base DataModule: loaders, batching and transforms; subclasses say where samples come from.

    Batching: ``crop`` trains on fixed-size random crops (labels padded with 255); ``pad`` pads
    each batch to its largest image; ``whole`` feeds whole images one at a time (the paper).
    Validation and test always see whole images, padded per batch when ``val_batch_size > 1``.

    ``label_map`` replaces label values before the range check, e.g. ``{255: 1}`` for binary
    masks saved as 0/255, or ``{3: 255}`` to ignore class 3. It acts on the values the dataset
    gives after its own conversion (NYUDv2 and SIFT Flow: 0-based classes, void = 255), on every
    head alike. ``check_labels()`` reads all labels once before training.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        batching: str = "crop",
        crop_size: int | Sequence[int] | None = 320,
        scale_range: Sequence[float] | None = (0.5, 2.0),
        hflip: bool = True,
        normalization: str | dict = "imagenet",
        loader_seed: int | None = 0,
        label_map: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        if batching not in BATCHING:
            raise ValueError(f"data.batching must be one of {BATCHING}, got {batching!r}")
        if batching == "whole" and batch_size != 1:
            raise ValueError(
                f"data.batching=whole trains on whole images one at a time: set data.batch_size=1 (got {batch_size})"
            )
        if batching == "crop" and not crop_size:
            raise ValueError("data.batching=crop needs data.crop_size")
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(
                f"data.batch_size and data.val_batch_size must be >= 1, got {batch_size}, {val_batch_size}"
            )
        self.root = Path(root).expanduser() if root is not None else None
        self.train_split, self.val_split = train_split, val_split
        self.test_split = test_split or val_split
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.batching, self.crop_size, self.scale_range, self.hflip = (
            batching,
            crop_size,
            scale_range,
            hflip,
        )
        self.normalization = normalization
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.datasets: dict[str, Dataset] = {}
        # the shuffling order and per-sample transforms of training depend on this seed only
        self.loader_seed = (
            int(loader_seed) if loader_seed is not None else torch.initial_seed() % 2**31
        )
        self._resume: dict[str, int] | None = None

    # --- where training stopped, saved in every checkpoint, for an exact mid-epoch resume
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done == 0 or done >= trainer.num_training_batches:
            return {}  # at an epoch boundary: the next epoch starts from its beginning
        # samples seen this epoch, over all processes
        return {
            "epoch": trainer.current_epoch,
            "samples_done": done * self.batch_size * trainer.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = getattr(self, "trainer", None)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        self._resume = dict(state) if state and fitting else None

    # --- what subclasses provide
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return voc_palette()

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def image_groups(self) -> int:
        """Leading groups of 3 channels that are images and get normalised (depth is not)."""
        return 1

    heads: dict[str, int] | None = None  # several label maps per sample: {head: classes}

    def make_dataset(self, split: str, transforms: Callable) -> Dataset:
        raise NotImplementedError

    def label_files(self, split: str) -> list[dict[str, Path]]:
        """The label file of each sample of a split, per head (``{"out": path}`` with one head)."""
        raise NotImplementedError

    @staticmethod
    def read_label(path: Path, head: str = "out") -> np.ndarray:
        """Class indices (255 = ignore) of one label file, after the dataset's own conversions and
        before ``label_map``: what training reads. A staticmethod, so that the label check's
        worker processes can be sent it."""
        raise NotImplementedError

    def check_labels(
        self, splits: Sequence[str] | None = None, *, workers: int | None = None
    ) -> LabelReport:
        """Read every label file of ``splits`` (default: the train, val and test splits) once,
        in ``workers`` processes (default ``os.cpu_count()``), with a per-file cache: class
        histograms, ignored share, empty labels, absent classes. Out-of-range values raise
        DataError naming the files; likely mistakes warn. See :mod:`.labelcheck`."""
        from .labelcheck import run_label_check  # labelcheck imports this module

        return run_label_check(self, splits, workers=workers)

    # --- Lightning hooks
    def train_transforms(self) -> Callable:
        return train_transforms(
            crop_size=self.crop_size if self.batching == "crop" else None,
            scale_range=self.scale_range,
            hflip=self.hflip,
            normalization=self.normalization,
            image_groups=self.image_groups,
        )

    def eval_transforms(self) -> Callable:
        return eval_transforms(normalization=self.normalization, image_groups=self.image_groups)

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": [("train", self.train_split, True), ("val", self.val_split, False)],
            "validate": [("val", self.val_split, False)],
            "test": [("test", self.test_split, False)],
            "predict": [("test", self.test_split, False)],
        }
        for key, split, train in wanted.get(stage or "fit", wanted["fit"]):
            if key not in self.datasets:
                self.datasets[key] = self.make_dataset(
                    split, self.train_transforms() if train else self.eval_transforms()
                )

    def _loader(
        self, key: str, batch_size: int, shuffle: bool, collate: Callable | None
    ) -> DataLoader:
        if key not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[key])
        dataset, sampler = self.datasets[key], None
        if key == "train":
            sampler = ResumableSampler(len(dataset), self.loader_seed, shuffle=shuffle)
            if self._resume:
                sampler.resume_at(self._resume["epoch"], self._resume["samples_done"])
                self._resume = None
            dataset = SeededDataset(dataset, self.loader_seed)
        elif (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
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
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        collate = pad_collate if self.batching == "pad" else None
        return self._loader("train", self.batch_size, True, collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, False, pad_collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, False, pad_collate)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def read_split_file(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"split list not found: {path} ({what})")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split list {path} is empty")
    return ids


def check_files_exist(
    ids: Sequence[str], paths: Callable[[str], Sequence[Path]], split: str
) -> None:
    """Fail at setup, not hours into an epoch, when a split names an id without its files."""
    for i in ids:
        for p in paths(i):
            if not p.is_file():
                name = i[-1] if isinstance(i, tuple) else i
                raise DataError(f"split '{split}' lists '{name}' but {p} does not exist")
