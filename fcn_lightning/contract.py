"""The contract between data and model: what a DataModule publishes and the model, the
LightningModule and the reports read; plain values, so that it travels in a checkpoint's
hyper-parameters. Heads are always a dict (one head: ``SINGLE_HEAD``); the single-head short
form exists only at the edges (:mod:`.reports`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

IGNORE_INDEX = 255
SINGLE_HEAD = "out"
# Input kinds and their channels; rgb and hha are images (normalised, shown in the panels).
INPUT_KINDS = {"rgb": 3, "hha": 3, "depth": 1}
IMAGE_KINDS = ("rgb", "hha")
# Whose statistics an input is normalised with, in words.
STATS_NAMES = {"voc": "PASCAL VOC", "nyud": "NYUDv2", "siftflow": "SIFT Flow"}
# One network's modality by the kinds of its inputs, in order (late fusion: joined by "+").
MODALITIES = {("rgb",): "rgb", ("hha",): "hha", ("depth",): "depth", ("rgb", "depth"): "rgbd"}
# The paper's four numbers (section 5, docs/PAPER.md "Metrics"), in the order every report uses.
METRIC_NAMES = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), the de facto segmentation palette."""

    def channel(i: int, bit: int) -> int:
        return sum(((i >> (3 * j + bit)) & 1) << (7 - j) for j in range(8))

    return [(channel(i, 0), channel(i, 1), channel(i, 2)) for i in range(n)]


@dataclass(frozen=True)
class Head:
    """One output of the model: its class names (index = class) and their colours."""

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError("a head needs at least one class")
        palette = self.palette or voc_palette()
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "palette", tuple(tuple(int(v) for v in c) for c in palette))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class InputGroup:
    """One group of input channels: its ``kind`` (:data:`INPUT_KINDS`) and ``stats``, the data
    set whose statistics normalise it (``voc``, ``nyud``, ``siftflow``)."""

    kind: str
    stats: str = "voc"

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {sorted(INPUT_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "stats", str(self.stats))

    @property
    def channels(self) -> int:
        return INPUT_KINDS[self.kind]

    @property
    def image(self) -> bool:
        """Normalised as an image (and drawn in the panels)."""
        return self.kind in IMAGE_KINDS

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "stats": self.stats}

    @classmethod
    def coerce(cls, group: InputGroup | Mapping[str, Any] | Sequence[str]) -> InputGroup:
        if isinstance(group, InputGroup):
            return group
        if isinstance(group, Mapping):
            return cls(str(group["kind"]), str(group.get("stats", "voc")))
        return cls(*group)


@dataclass(frozen=True)
class DataContract:
    """What a DataModule gives and a model must match: ``heads`` (name -> :class:`Head`, in
    order; the first picks the best checkpoint), ``inputs`` (one :class:`InputGroup` per channel
    group, in input order; the image groups lead), ``streams`` (late fusion: stream name -> its
    channels, in input order; ``None`` for one network) and the ``ignore_index`` of the labels."""

    heads: Mapping[str, Head]
    inputs: Sequence[InputGroup | Mapping[str, Any] | Sequence[str]]
    streams: Mapping[str, int] | None = None
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not self.heads:
            raise ValueError("a data contract needs at least one head")
        inputs = tuple(InputGroup.coerce(g) for g in self.inputs)
        object.__setattr__(self, "inputs", inputs)
        kinds = [g.kind for g in inputs]
        if self.streams and sum(self.streams.values()) != self.in_channels:
            raise ValueError(
                f"streams {dict(self.streams)} do not add up to in_channels={self.in_channels}"
            )
        images = [g.image for g in inputs]
        if images != sorted(images, reverse=True):
            raise ValueError(f"inputs {kinds}: the image groups must be the leading ones")
        bounds = {sum(g.channels for g in inputs[:i]) for i in range(len(inputs) + 1)}
        for name, (start, stop) in self.stream_channels().items():
            if start not in bounds or stop not in bounds:
                raise ValueError(f"stream {name!r} splits an input group of {kinds}")

    @property
    def in_channels(self) -> int:
        return sum(g.channels for g in self.inputs)

    @property
    def image_groups(self) -> int:
        """The leading groups of 3 channels that are images (normalised, shown in the panels)."""
        return sum(g.image for g in self.inputs)

    @property
    def num_classes(self) -> dict[str, int]:
        """head -> number of classes: what the model is built with."""
        return {name: h.num_classes for name, h in self.heads.items()}

    @property
    def first_head(self) -> str:
        return next(iter(self.heads))

    @property
    def single(self) -> bool:
        """One head called ``SINGLE_HEAD``: reports use the short form."""
        return list(self.heads) == [SINGLE_HEAD]

    def class_names(self, head: str) -> list[str]:
        return list(self.heads[head].class_names)

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of ``build_fcn`` that the data decides."""
        kw: dict[str, Any] = {"heads": self.num_classes, "in_channels": self.in_channels}
        if self.streams:
            kw["streams"] = dict(self.streams)
        return kw

    def __iter__(self) -> Iterator[str]:
        return iter(self.heads)

    @property
    def modality(self) -> str:
        """``rgb``, ``hha``, ``depth``, ``rgbd``; late fusion: the streams' joined by "+"."""
        if self.streams:
            return "+".join(
                _modality(self.inputs_in(a, b)) for a, b in self.stream_channels().values()
            )
        return _modality(self.inputs)

    @property
    def image_inputs(self) -> list[tuple[str, str]]:
        """(kind, stats) of each image group, in input order (its normalisation's key)."""
        return [(g.kind, g.stats) for g in self.inputs if g.image]

    def stream_channels(self) -> dict[str, tuple[int, int]]:
        """Late fusion: each stream's channels of the input, (start, stop); {} for one net."""
        spans, start = {}, 0
        for name, channels in (self.streams or {}).items():
            spans[name] = (start, start + int(channels))
            start += int(channels)
        return spans

    def inputs_in(self, start: int, stop: int) -> tuple[InputGroup, ...]:
        """The input groups within channels ``start:stop`` (e.g. one stream's)."""
        found, at = [], 0
        for g in self.inputs:
            if start <= at and at + g.channels <= stop:
                found.append(g)
            at += g.channels
        return tuple(found)

    def stream_contract(self, name: str) -> DataContract:
        """One late-fusion stream's contract alone (what a checkpoint for it was trained on)."""
        start, stop = self.stream_channels()[name]
        return DataContract(self.heads, self.inputs_in(start, stop), None, self.ignore_index)

    def image_groups_in(self, start: int, stop: int) -> list[int]:
        """The indices of the image groups within channels ``start:stop``."""
        return [g for g in range(self.image_groups) if start <= 3 * g and 3 * g + 3 <= stop]

    def as_dict(self) -> dict[str, Any]:
        return {
            "heads": {
                name: {"class_names": list(h.class_names), "palette": [list(c) for c in h.palette]}
                for name, h in self.heads.items()
            },
            "in_channels": self.in_channels,
            "streams": dict(self.streams) if self.streams else None,
            "image_groups": self.image_groups,
            "ignore_index": self.ignore_index,
            "inputs": [g.as_dict() for g in self.inputs],
        }

    @classmethod
    def from_dict(cls, d: DataContract | Mapping[str, Any]) -> DataContract:
        """From :meth:`as_dict`'s plain values (a contract is returned as it is)."""
        if isinstance(d, DataContract):
            return d
        heads = {
            str(name): Head(tuple(h["class_names"]), tuple(tuple(c) for c in h["palette"]))
            for name, h in d["heads"].items()
        }
        streams = dict(d["streams"]) if d["streams"] else None
        return cls(heads, d["inputs"], streams, int(d["ignore_index"]))

    @classmethod
    def for_classes(
        cls,
        heads: Mapping[str, int] | Mapping[str, Sequence[str]],
        *,
        inputs: Sequence[InputGroup | Sequence[str]] = (("rgb", "voc"),),
        streams: Mapping[str, int] | None = None,
    ) -> DataContract:
        """From class counts (numbered names) or class-name lists per head, in the VOC palette;
        a VOC photo unless ``inputs`` say otherwise."""
        return cls(
            {
                str(name): Head(tuple(str(i) for i in range(c)) if isinstance(c, int) else tuple(c))
                for name, c in heads.items()
            },
            inputs,
            streams,
        )


def _modality(groups: Sequence[InputGroup]) -> str:
    kinds = tuple(g.kind for g in groups)
    return MODALITIES.get(kinds, "+".join(kinds))


def inputs_of(contract: DataContract) -> str:
    """The input a contract describes, in words: ``6 channels (streams rgb 3, hha 3)``."""
    streams = contract.streams
    named = f" (streams {', '.join(f'{k} {v}' for k, v in streams.items())})" if streams else ""
    return f"{contract.in_channels} input channels{named}"


def modality_of(contract: DataContract) -> str:
    """What a contract's input is, in words: ``rgb+hha input (NYUDv2 statistics)``."""
    stats = list(dict.fromkeys(g.stats for g in contract.inputs))
    named = (
        f"{STATS_NAMES.get(stats[0], stats[0])} statistics"
        if len(stats) == 1
        else ", ".join(f"{g.kind}: {STATS_NAMES.get(g.stats, g.stats)}" for g in contract.inputs)
    )
    return f"{contract.modality} input ({named})"


def input_mismatch(wants: DataContract, gives: DataContract) -> str | None:
    """Why data of contract ``gives`` cannot feed a model trained on ``wants`` (their input
    kinds or streams differ: an RGB net on HHA images), or None."""
    same_streams = dict(wants.streams or {}) == dict(gives.streams or {})
    if [g.kind for g in wants.inputs] == [g.kind for g in gives.inputs] and same_streams:
        return None
    return f"takes {modality_of(wants)} but the data gives {modality_of(gives)}"


def plain(value: Any) -> Any:
    """DictConfig / ListConfig / tuples -> plain dicts and lists (checkpoint-safe hparams)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
