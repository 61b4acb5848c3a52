"""What export.py runs: a checkpoint's network as an ONNX model or a torch.export ExportedProgram,
verified against the checkpoint before it is kept, with the metadata a deployer needs.

``export(cfg)`` loads ``cfg.ckpt_path`` alone (:func:`~fcn_lightning.evaluation.load_module`) and
exports its ``module.model`` (the plain forward: no shift-and-stitch), with the batch, height and
width dynamic: one input ``image`` (N, C, H, W) float32, normalised as the sidecar says; one output
per head, named after it, the logits (N, classes, H, W) at the input's own size in either geometry
(``paper``: padded by 100 inside the net and cropped back; ``same``: no margin).

- ``format=onnx``: ``torch.onnx.export`` (the torch.export-based exporter, which needs onnx and
  onnxscript), the metadata in the model's ``metadata_props`` under ``fcn_lightning``; verified
  with onnxruntime.
- ``format=exported_program``: ``torch.export.export`` saved by ``torch.export.save`` (``.pt2``),
  the metadata in its ``extra_files`` (``fcn_lightning.json``); verified with
  ``torch.export.load(...).module()``.

Both trace the net once with symbolic sizes under torch's size-oblivious reasoning (see
:func:`size_oblivious`), so the one graph holds for every input size: the paper geometry's crop
offsets and the skips' fusions are computed from the input's size inside the graph.

Verification, before the file gets its name: the model is written to a hidden temporary file
beside ``output`` (:func:`~fcn_lightning.atomic.write_atomically`), loaded from there and run on a
test input at two sizes (``image=PATH``: that image, read and normalised as predict.py reads it,
and the image resized; without it a seeded random input); per size and head the output's shape
and the largest difference from the checkpoint's PyTorch model are printed. A head fails when its
shape differs or ``max |exported - pytorch| > tolerance + rtol * max |pytorch|``: float32 sums of
thousands of products (a VGG16 layer's) come out of two runtimes differently rounded, by an amount
that grows with the logits' size (nets trained on 0..255 inputs, the reference's recipe, give
logits in the hundreds), while any real error (a crop off by a pixel, a skipped layer) differs by
the order of the logits themselves. A failure exits non-zero and removes the temporary file: no
model file is left under ``output`` (an earlier one there stays as it was).

Beside the model, ``<output>.json`` (the sidecar, e.g. ``fcn8s.onnx.json``) holds the same metadata as the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
import torch.fx.experimental._config as fx_config
from omegaconf import DictConfig
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..atomic import write_atomically, write_json_atomic
from ..contract import IGNORE_INDEX, inputs_of
from ..data.readers import read_image
from ..data.transforms import eval_transforms
from ..errors import ConfigError
from ..models.stitch import output_strides
from ..module import FCNModule
from ..normalization import LOG_DEPTH_MEANS, Normalization
from .common import load_module

FORMATS = {"onnx": ".onnx", "exported_program": ".pt2"}
INPUT_NAME = "image"
METADATA_KEY = "fcn_lightning"  # ONNX metadata_props key; the .pt2's extra file is this + .json
EXTRA_FILE = f"{METADATA_KEY}.json"
WRITTEN_BY = "fcn-lightning export"
SIZE = (75, 93)  # the random test input's first size (H, W); the second: other_size(SIZE)
EXAMPLE = (2, 75, 93)  # the traced example: batch 2 and sizes of no special value (not 1, not 32k)
ONNX_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
INSTALL = 'pip install -e ".[export]"'
FORMULA = "x' = (x[order] * scale - mean) / std"


# --------------------------------------------------------------------------- settings and paths
def check_format(fmt: Any) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {tuple(FORMATS)}, got {fmt!r}")
    return str(fmt)


def allowance(cfg: DictConfig) -> tuple[float, float]:
    """(tolerance, rtol): numbers >= 0."""
    values = []
    for name, default in (("tolerance", 1e-4), ("rtol", 1e-5)):
        value = cfg.get(name, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number >= 0 or isinstance(value, bool):
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        values.append(number)
    return values[0], values[1]


def onnx_modules() -> tuple[Any, Any]:
    """(onnx, onnxruntime); onnxscript checked too (torch's exporter needs it). Missing: say
    how to install them."""
    found = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            raise ConfigError(
                f"format=onnx needs onnx, onnxscript and onnxruntime ({name} is not installed): "
                f"{INSTALL}"
            ) from None
    return found[0], found[2]


def sidecar_path(out: Path) -> Path:
    """``<output>.json`` (``fcn8s.onnx.json``): the two formats of one net can share a folder."""
    return out.with_name(out.name + ".json")


def output_path(cfg: DictConfig, fmt: str) -> Path:
    """The model file: ``output``, else ``model.<suffix>`` in this run's folder."""
    if cfg.get("output"):
        return Path(str(cfg.output)).expanduser()
    return Path(cfg.paths.output_dir) / f"model{FORMATS[fmt]}"


def same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(out: Path, fmt: str, ckpt: Path, overwrite: bool) -> None:
    """Refuse an output that is the checkpoint, a folder, of another suffix, or (unless
    ``overwrite``) already there, model or sidecar."""
    suffix = FORMATS[fmt]
    sidecar = sidecar_path(out)
    for path in (out, sidecar):
        if same_file(path, ckpt):
            raise ConfigError(
                f"output={out} would write {path}, the checkpoint itself; pass e.g. "
                f"output={ckpt.with_suffix(suffix)}"
            )
    if out.is_dir():
        raise ConfigError(f"output={out} is a folder; output names the model file, e.g. "
                          f"output={out / ('model' + suffix)}")  # fmt: skip
    if out.suffix.lower() != suffix:
        other = [f for f, s in FORMATS.items() if s == out.suffix.lower()]
        hint = f", or format={other[0]}" if other else ""
        raise ConfigError(
            f"output={out} does not end in {suffix}, the suffix of format={fmt}: pass "
            f"output={out.with_suffix(suffix)}{hint}"
        )
    there = [str(p) for p in (out, sidecar) if p.exists() or p.is_symlink()]
    if there and not overwrite:
        raise ConfigError(
            f"{' and '.join(there)} already exist(s); refusing to overwrite: pass "
            "overwrite=true, or another output="
        )
    if sidecar.is_dir():
        raise ConfigError(f"{sidecar} (the sidecar of output={out}) is a folder")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- metadata
def normalization_entry(norm: Normalization) -> dict[str, Any]:
    """One image group's normalisation: the checkpoint's fields and the same on 0..1."""
    return {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in norm.as_dict().items()},
        "formula": FORMULA,
        "unit_mean": norm.unit_mean,
        "unit_std": norm.unit_std,
        "described": norm.describe(),
    }


def depth_encoding(stats: str) -> str:
    mean = LOG_DEPTH_MEANS.get(stats)
    minus = f"minus {mean} (the mean log depth of {stats})" if mean is not None else "(no mean)"
    return (
        "one channel, not an image: natural log of the depth in millimetres (values below 1 "
        f"taken as 1), {minus}; the reference's encoding (fcn_lightning/data/nyud.py read_depth)"
    )


def input_groups(module: FCNModule) -> list[dict[str, Any]]:
    """The input's channel groups in order: what each is and how it is normalised."""
    contract, norms = module.contract, module.input_normalizations
    groups: list[dict[str, Any]] = []
    at, image = 0, 0
    recorded = contract.inputs
    kinds = (
        [(g.kind, g.stats, g.channels, g.image) for g in recorded]
        if recorded is not None
        else [(k, s, 3, True) for k, s in contract.image_inputs]
    )
    for kind, stats, channels, is_image in kinds:
        group: dict[str, Any] = {"kind": kind, "stats": stats, "channels": [at, at + channels]}
        if is_image:
            group["image"] = True
            group["what"] = (
                "a photo: R, G, B in 0..1 (8-bit values / 255)"
                if kind == "rgb"
                else "an HHA image (disparity, height, angle) in 0..1 (8-bit values / 255), "
                "channels in the file's own order"
            )
            group["normalization"] = normalization_entry(norms[image])
            image += 1
        else:
            group["image"] = False
            group["encoding"] = depth_encoding(stats) if kind == "depth" else "as stored"
        groups.append(group)
        at += channels
    if at < contract.in_channels:  # inputs not recorded: the rest is unknown
        groups.append(
            {"kind": "unrecorded", "channels": [at, contract.in_channels], "image": False}
        )
    return groups


def metadata(module: FCNModule, ckpt: Path, fmt: str, out: Path) -> dict[str, Any]:
    """What a deployer needs, as plain JSON values (the sidecar; also inside the model)."""
    contract, spec = module.contract, module.model.spec
    geometry = {
        "paper": "the reference's: the net pads its input by 100 pixels and crops the upsampled "
        "scores back to the input's size",
        "same": "no margin: each upsampling padded so the scores cover the input; cropped to "
        "the input's size",
    }[spec.geometry]
    return {
        "written_by": WRITTEN_BY,
        "format": fmt,
        "torch": torch.__version__,
        "model_file": out.name,
        "checkpoint": {"path": str(ckpt.resolve()), "sha256": sha256(ckpt)},
        "model": {
            "arch": spec.arch,
            "backbone": spec.backbone,
            "width": spec.width,
            "geometry": spec.geometry,
            "geometry_means": geometry,
            "output_stride": max(output_strides(module.model)),
        },
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", contract.in_channels, "height", "width"],
            "dtype": "float32",
            "channels": contract.in_channels,
            "modality": contract.modality,
            "streams": {k: list(v) for k, v in contract.stream_channels().items()} or None,
            "groups": input_groups(module),
            "described": inputs_of(contract),
        },
        "outputs": {
            head: {
                "name": head,
                "shape": ["batch", h.num_classes, "height", "width"],
                "what": "logits (unnormalised class scores); argmax over axis 1 gives the label",
                "class_names": list(h.class_names),
                "palette": [list(c) for c in h.palette],
            }
            for head, h in contract.heads.items()
        },
        "ignore_index": contract.ignore_index,
        "ignore_means": (
            f"label value {contract.ignore_index} in ground truth marks void pixels (not scored, "
            "not trained on); the model never predicts it"
            if contract.ignore_index == IGNORE_INDEX
            else f"label value {contract.ignore_index} is void in ground truth"
        ),
    }


# --------------------------------------------------------------------------- test inputs
def other_size(h: int, w: int) -> tuple[int, int]:
    """A second test size unlike the first in both sides, neither a multiple of 32."""

    def side(n: int, step: int) -> int:
        m = n + step
        return m + 2 if m % 32 == 0 else m

    return side(h, 37), side(w, -19 if w > 64 else 21)


def normalize(x: torch.Tensor, module: FCNModule) -> torch.Tensor:
    """An input whose image groups are in 0..1 (N, C, H, W), normalised as the data does it."""
    transform = eval_transforms(
        normalization=list(module.input_normalizations),
        image_groups=module.contract.image_groups,
    )
    return torch.stack([transform(tv_tensors.Image(s)).as_subclass(torch.Tensor) for s in x])


def random_input(module: FCNModule, n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A seeded test input of the checkpoint's channels: image groups uniform in 0..1 and then
    normalised; a depth channel as read_depth encodes 0.5 m to 10 m; anything else N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, module.contract.in_channels, h, w, generator=g)
    for group in input_groups(module):
        a, b = group["channels"]
        if group["image"]:
            x[:, a:b] = torch.rand(n, b - a, h, w, generator=g)
        elif group["kind"] == "depth":
            mm = 500 + 9500 * torch.rand(n, b - a, h, w, generator=g)
            x[:, a:b] = mm.log() - LOG_DEPTH_MEANS.get(group["stats"], 0.0)
    return normalize(x, module)


def test_inputs(module: FCNModule, image: Any) -> list[tuple[str, torch.Tensor]]:
    """(what, input) at two sizes: ``image`` (a file) and it resized, else seeded random ones
    (batch 1, then batch 2)."""
    if not image:
        h, w = SIZE
        h2, w2 = other_size(h, w)
        return [
            ("random", random_input(module, 1, h, w, seed=0)),
            ("random", random_input(module, 2, h2, w2, seed=1)),
        ]
    path = Path(str(image)).expanduser()
    contract = module.contract
    if contract.in_channels != 3:
        raise ConfigError(
            f"image={path}: the checkpoint takes {inputs_of(contract)}, not one image; leave "
            "image= out (a random input of its channels is used)"
        )
    pixels = read_image(path, exif_transpose=True)  # as predict.py reads it
    h, w = pixels.shape[-2:]
    resized = TF.resize(pixels, list(other_size(h, w)), antialias=True)
    return [
        (path.name, normalize(pixels[None].float() / 255, module)),
        (f"{path.name} resized", normalize(resized[None].float() / 255, module)),
    ]


# --------------------------------------------------------------------------- export
def size_oblivious() -> contextlib.AbstractContextManager:
    """torch's size-oblivious reasoning for the traced sizes, where this torch has it.

    Without it torch.export assumes that no traced size is 1 or equal to another it happens to
    equal in the example, and guards on it: the exported graph would then refuse inputs whose
    feature maps come out 1 pixel wide (the paper geometry below ~26 pixels), or, in the same
    geometry, any input whose side is a multiple of 32 (the crop to the input's size is then
    empty). The graph is the same; the verification runs it at sizes that would have failed."""
    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """The exporter's step-by-step information kept off the console and the log."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def dims() -> dict[int, Any]:
    d = torch.export.Dim.DYNAMIC
    return {0: d, 2: d, 3: d}


def exported_program(model: torch.nn.Module, example: torch.Tensor) -> Any:
    with size_oblivious():
        return torch.export.export(model, (example,), dynamic_shapes={"x": dims()})


def onnx_model(model: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any]) -> Any:
    """The ONNX ModelProto, the metadata in its metadata_props."""
    onnx, _ = onnx_modules()
    names = {0: "batch", 2: "height", 3: "width"}
    with size_oblivious(), quiet(*ONNX_LOGGERS):
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes={"x": names},
            input_names=[INPUT_NAME],
            output_names=list(model.head_names),
            verbose=False,
        )
    proto = program.model_proto
    meta["opset"] = next(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None
    )
    proto.doc_string = f"{meta['model']['arch']} from {meta['checkpoint']['path']}"
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    return proto


class ExportedRunner:
    """Runs a written model file as its deployer would: name -> outputs (numpy)."""

    def __init__(self, path: Path, fmt: str, heads: list[str]) -> None:
        self.fmt, self.heads = fmt, heads
        if fmt == "onnx":
            _, ort = onnx_modules()
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.metadata = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        else:
            extra = {EXTRA_FILE: ""}
            with open(path, "rb") as f:  # a file object: the temporary name does not end in .pt2
                self.module = torch.export.load(f, extra_files=extra).module()
            self.metadata = extra[EXTRA_FILE]

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fmt == "onnx":
            outs = self.session.run(self.heads, {INPUT_NAME: x.numpy()})
            return {h: torch.from_numpy(o) for h, o in zip(self.heads, outs, strict=True)}
        with torch.no_grad():
            return dict(self.module(x))


def compare(
    runner: ExportedRunner,
    model: torch.nn.Module,
    inputs: list[tuple[str, torch.Tensor]],
    tolerance: float,
    rtol: float,
) -> list[str]:
    """Print a line per size and head; return the failures."""
    failures = []
    for what, x in inputs:
        with torch.no_grad():
            want = model(x)
        got = runner(x)
        for head, ref in want.items():
            out = got.get(head)
            size = "x".join(map(str, x.shape))
            if out is None or tuple(out.shape) != tuple(ref.shape):
                shape = None if out is None else tuple(out.shape)
                line = (
                    f"input {size} ({what}), head {head}: shape {shape}, wanted {tuple(ref.shape)}"
                )
                failures.append(line)
                print(line)
                continue
            diff = float((out.float() - ref).abs().max()) if ref.numel() else 0.0
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            allowed = tolerance + rtol * scale
            labels = int((out.argmax(1) != ref.argmax(1)).sum()) if ref.numel() else 0
            line = (
                f"input {size} ({what}), head {head}: output {tuple(out.shape)}, max |diff| "
                f"{diff:.3g} (logits up to {scale:.3g}; allowed {allowed:.3g}); labels differ "
                f"at {labels} pixel(s)"
            )
            print(line)
            if not diff <= allowed:  # NaN fails too
                failures.append(line)
            if float(ref.amax() - ref.amin()) == 0:
                print(f"  note: the checkpoint's {head} logits are constant here (untrained?)")
    return failures


def write_and_verify(
    f: IO[bytes],
    write: Any,
    fmt: str,
    meta: dict[str, Any],
    module: FCNModule,
    inputs: list[tuple[str, torch.Tensor]],
    cfg: DictConfig,
) -> None:
    """Inside write_atomically: write the model to the temporary file ``f``, run it from there
    and compare; a failure raises (the temporary file is then removed)."""
    write(f)
    f.flush()
    runner = ExportedRunner(Path(f.name), fmt, list(module.contract))
    if runner.metadata is None or json.loads(runner.metadata) != meta:
        raise SystemExit(f"Error: the exported model's metadata did not survive writing ({fmt})")
    failures = compare(runner, module.model, inputs, *allowance(cfg))
    if failures:
        raise SystemExit(
            f"Error: the exported model differs from the checkpoint's ({len(failures)} "
            "failure(s)):\n" + "\n".join(f"  {line}" for line in failures) + "\nnothing was "
            "written (tolerance=, rtol= set what is allowed)"
        )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s network (``cfg.format``) to ``cfg.output``, verified; returns
    the metadata written beside it (and into it)."""
    fmt = check_format(cfg.get("format", "onnx"))
    allowance(cfg)  # a bad tolerance fails now, not after the export
    if fmt == "onnx":
        onnx_modules()
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is not set: pass ckpt_path=/path/to/best.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    out = output_path(cfg, fmt)
    check_output(out, fmt, ckpt, bool(cfg.get("overwrite", False)))
    module = load_module(ckpt)
    model = module.model.eval()
    inputs = test_inputs(module, cfg.get("image"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(module, ckpt, fmt, out)
    example = random_input(module, *EXAMPLE, seed=2)
    start = time.perf_counter()
    if fmt == "onnx":
        proto = onnx_model(model, example, meta)

        def write(f: IO[bytes]) -> None:
            f.write(proto.SerializeToString())
    else:
        program = exported_program(model, example)
        text = json.dumps(meta)

        def write(f: IO[bytes]) -> None:
            torch.export.save(program, f, extra_files={EXTRA_FILE: text})

    print(f"exported {spec_line(module)} to {fmt} in {time.perf_counter() - start:.1f} s")
    write_atomically(out, lambda f: write_and_verify(f, write, fmt, meta, module, inputs, cfg))
    write_json_atomic(sidecar_path(out), meta)
    print(f"written: {out} ({out.stat().st_size / 2**20:.1f} MiB) and {sidecar_path(out)}")
    return meta


def spec_line(module: FCNModule) -> str:
    spec = module.model.spec
    heads = ", ".join(f"{h} {n}" for h, n in spec.heads)
    return f"{spec.arch} ({spec.backbone}, {spec.geometry} geometry; heads {heads})"


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata inside an exported model file (either format)."""
    path = Path(path)
    fmt = next((f for f, s in FORMATS.items() if s == path.suffix.lower()), None)
    if fmt is None:
        raise ConfigError(f"{path}: not a {' or '.join(FORMATS.values())} file")
    if fmt == "onnx":
        onnx, _ = onnx_modules()
        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
        return json.loads(props[METADATA_KEY])
    extra = {EXTRA_FILE: ""}
    with open(path, "rb") as f:
        torch.export.load(f, extra_files=extra)
    return json.loads(extra[EXTRA_FILE])
