"""The contract between data and model (docs/ARCHITECTURE.md, "The flow"): what a DataModule
publishes and the model, the LightningModule and the reports read; plain values, so that it
travels in a checkpoint's hyper-parameters. Heads are always a dict (one head: ``SINGLE_HEAD``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

IGNORE_INDEX = 255
SINGLE_HEAD = "out"
# Input kinds and their channels; rgb and hha are images (normalised, shown in the panels).
INPUT_KINDS = {"rgb": 3, "hha": 3, "depth": 1}
IMAGE_KINDS = ("rgb", "hha")
# Whose statistics an input is normalised with, in words.
STATS_NAMES = {"voc": "PASCAL VOC", "nyud": "NYUDv2", "siftflow": "SIFT Flow"}
# The paper's four numbers (section 5, docs/PAPER.md "Metrics"), in the order every report uses.
METRIC_NAMES = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), the de facto segmentation palette."""
    return [
        tuple(sum(((i >> (3 * j + c)) & 1) << (7 - j) for j in range(8)) for c in range(3))
        for i in range(n)
    ]


@dataclass(frozen=True)
class Head:
    """One output of the model: its class names (index = class) and their colours (VOC's by
    default); any sequences, kept as tuples."""

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError("a head needs at least one class")
        palette = tuple(tuple(int(v) for v in c) for c in self.palette or voc_palette())
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "palette", palette)

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
    def image(self) -> bool:  # normalised as an image (and drawn in the panels)
        return self.kind in IMAGE_KINDS


def _group(g: InputGroup | Mapping[str, Any] | Sequence[str]) -> InputGroup:
    if isinstance(g, Mapping):
        return InputGroup(str(g["kind"]), str(g.get("stats", "voc")))
    return g if isinstance(g, InputGroup) else InputGroup(*g)


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
        object.__setattr__(self, "inputs", inputs := tuple(map(_group, self.inputs)))
        kinds = [g.kind for g in inputs]
        if self.streams and sum(self.streams.values()) != self.in_channels:
            raise ValueError(
                f"streams {dict(self.streams)} do not add up to in_channels={self.in_channels}"
            )
        if [g.image for g in inputs] != sorted((g.image for g in inputs), reverse=True):
            raise ValueError(f"inputs {kinds}: the image groups must be the leading ones")
        bounds = set(self._starts())
        for name, (start, stop) in self.stream_channels().items():
            if start not in bounds or stop not in bounds:
                raise ValueError(f"stream {name!r} splits an input group of {kinds}")

    def _starts(self) -> list[int]:  # the first channel of each input group, then the end
        return list(accumulate((g.channels for g in self.inputs), initial=0))

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
        return kw | ({"streams": dict(self.streams)} if self.streams else {})

    def __iter__(self) -> Iterator[str]:
        return iter(self.heads)

    @property
    def modality(self) -> str:
        """``rgb``, ``hha``, ``depth``, ``rgbd``; late fusion: the streams' joined by "+"."""
        spans = self.stream_channels().values() or [(0, self.in_channels)]
        kinds = (tuple(g.kind for g in self.inputs_in(*span)) for span in spans)
        return "+".join("rgbd" if k == ("rgb", "depth") else "+".join(k) for k in kinds)

    @property
    def image_inputs(self) -> list[tuple[str, str]]:
        """(kind, stats) of each image group, in input order (its normalisation's key)."""
        return [(g.kind, g.stats) for g in self.inputs if g.image]

    def stream_channels(self) -> dict[str, tuple[int, int]]:
        """Late fusion: each stream's channels of the input, (start, stop); {} for one net."""
        streams = {n: int(c) for n, c in (self.streams or {}).items()}
        ends = accumulate(streams.values())
        return {n: (end - c, end) for (n, c), end in zip(streams.items(), ends, strict=True)}

    def inputs_in(self, start: int, stop: int) -> tuple[InputGroup, ...]:
        """The input groups within channels ``start:stop`` (e.g. one stream's)."""
        at = zip(self.inputs, self._starts(), strict=False)
        return tuple(g for g, a in at if start <= a and a + g.channels <= stop)

    def stream_contract(self, name: str) -> DataContract:
        """One late-fusion stream's contract alone (what a checkpoint for it was trained on)."""
        start, stop = self.stream_channels()[name]
        return DataContract(self.heads, self.inputs_in(start, stop), None, self.ignore_index)

    def image_groups_in(self, start: int, stop: int) -> list[int]:
        """The indices of the image groups within channels ``start:stop``."""
        return [g for g in range(self.image_groups) if start <= 3 * g and 3 * g + 3 <= stop]

    def as_dict(self) -> dict[str, Any]:  # plain values, lists for tuples: checkpoint-safe
        return plain(
            {
                "heads": {name: asdict(h) for name, h in self.heads.items()},
                "in_channels": self.in_channels,
                "streams": dict(self.streams) if self.streams else None,
                "image_groups": self.image_groups,
                "ignore_index": self.ignore_index,
                "inputs": [asdict(g) for g in self.inputs],
            }
        )

    @classmethod
    def from_dict(cls, d: DataContract | Mapping[str, Any]) -> DataContract:
        """From :meth:`as_dict`'s plain values (a contract is returned as it is)."""
        if isinstance(d, DataContract):
            return d
        heads = {str(name): Head(h["class_names"], h["palette"]) for name, h in d["heads"].items()}
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
        named = {str(n): Head(range(c) if isinstance(c, int) else c) for n, c in heads.items()}
        return cls(named, inputs, streams)


def inputs_of(contract: DataContract) -> str:
    """The input a contract describes, in words: ``6 channels (streams rgb 3, hha 3)``."""
    streams = contract.streams
    named = f" (streams {', '.join(f'{k} {v}' for k, v in streams.items())})" if streams else ""
    return f"{contract.in_channels} input channels{named}"


def modality_of(contract: DataContract) -> str:
    """What a contract's input is, in words: ``rgb+hha input (NYUDv2 statistics)``."""
    named = [(g.kind, STATS_NAMES.get(g.stats, g.stats)) for g in contract.inputs]
    if len({g.stats for g in contract.inputs}) == 1:
        return f"{contract.modality} input ({named[0][1]} statistics)"
    return f"{contract.modality} input ({', '.join(f'{k}: {s}' for k, s in named)})"


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
