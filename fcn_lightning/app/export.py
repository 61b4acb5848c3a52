"""What export.py runs: a checkpoint's network as ONNX or an ExportedProgram, verified against the
checkpoint before it is renamed into place; docs/DEPLOYING.md describes the files and metadata."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.fx.experimental._config as fx_config
from omegaconf import DictConfig
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..atomic import write_atomically, write_json_atomic
from ..contract import inputs_of
from ..data.readers import read_image
from ..data.transforms import eval_transforms
from ..errors import ConfigError, ExportError
from ..models.stitch import output_strides
from ..module import FCNModule
from ..normalization import LOG_DEPTH_MEANS
from .common import load_module, quiet

FORMATS = {"onnx": ".onnx", "exported_program": ".pt2"}
INPUT_NAME = "image"
METADATA_KEY = "fcn_lightning"  # ONNX metadata_props key; the .pt2's extra file is this + .json
EXTRA_FILE = f"{METADATA_KEY}.json"
WRITTEN_BY = "fcn-lightning export"
SIZE = (75, 93)  # the random test input's first size (H, W); the second: other_size(*SIZE)
EXAMPLE = (2, 75, 93)  # the traced example: batch 2 and sizes of no special value (not 1, not 32k)


def allowance(cfg: DictConfig) -> tuple[float, float]:
    """(tolerance, rtol): numbers >= 0."""
    values = []
    for name, default in (("tolerance", 1e-4), ("rtol", 1e-5)):
        value = cfg.get(name, default)
        with contextlib.suppress(TypeError, ValueError):
            if float(value) >= 0 and not isinstance(value, bool):
                values.append(float(value))
                continue
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    return values[0], values[1]


def onnx_modules() -> tuple[Any, Any]:
    """(onnx, onnxruntime); onnxscript checked too (torch's exporter needs it)."""
    found = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            raise ConfigError(
                f"format=onnx needs onnx, onnxscript and onnxruntime ({name} is not installed): "
                'pip install -e ".[export]"'
            ) from None
    return found[0], found[2]


def sidecar_path(out: Path) -> Path:
    """``<output>.json`` (``fcn8s.onnx.json``): the two formats of one net can share a folder."""
    return out.with_name(out.name + ".json")


def check_output(out: Path, fmt: str, ckpt: Path, overwrite: bool) -> None:
    """Refuse the checkpoint, a folder, another suffix, or (unless ``overwrite``) a file there."""
    suffix, sidecar = FORMATS[fmt], sidecar_path(out)
    same = [os.path.samefile(p, ckpt) if p.exists() and ckpt.exists() else p.resolve() == ckpt.resolve()
            for p in (out, sidecar)]  # fmt: skip
    if any(same):
        raise ConfigError(
            f"output={out} would write the checkpoint itself; pass e.g. "
            f"output={ckpt.with_suffix(suffix)}"
        )
    if out.is_dir():
        raise ConfigError(f"output={out} is a folder; output names the model file, e.g. "
                          f"output={out / ('model' + suffix)}")  # fmt: skip
    if out.suffix.lower() != suffix:
        other = [f for f, s in FORMATS.items() if s == out.suffix.lower()]
        raise ConfigError(
            f"output={out} does not end in {suffix}, the suffix of format={fmt}: pass "
            f"output={out.with_suffix(suffix)}" + (f", or format={other[0]}" if other else "")
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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def input_groups(module: FCNModule) -> list[dict[str, Any]]:
    """The input's channel groups in order: kind, channels [from, to), normalisation or encoding."""
    norms, groups, at = iter(module.input_normalizations), [], 0
    for g in module.contract.inputs:
        group: dict[str, Any] = {"kind": g.kind, "stats": g.stats,
                                 "channels": [at, at + g.channels], "image": g.image}  # fmt: skip
        if g.image:
            norm = next(norms)
            fields = {k: list(v) if isinstance(v, tuple) else v for k, v in norm.as_dict().items()}
            group["normalization"] = {**fields, "unit_mean": norm.unit_mean,
                                      "unit_std": norm.unit_std}  # fmt: skip
        elif g.kind == "depth":  # data/nyud.py read_depth: log(max(mm, 1)) - the mean log depth
            mean = LOG_DEPTH_MEANS.get(g.stats)
            group["encoding"] = {"unit": "mm", "log": True, "min": 1.0, "minus": mean}
        at += g.channels
        groups.append(group)
    return groups


def metadata(module: FCNModule, ckpt: Path, fmt: str, out: Path) -> dict[str, Any]:
    """What a deployer needs, as plain JSON values: data only, no sentences, no local paths."""
    contract, spec = module.contract, module.model.spec
    return {
        "written_by": WRITTEN_BY,
        "format": fmt,
        "torch": torch.__version__,
        "model_file": out.name,
        "checkpoint": {"file": ckpt.name, "sha256": sha256(ckpt)},
        "model": {k: getattr(spec, k) for k in ("arch", "backbone", "width", "geometry")}
        | {"output_stride": max(output_strides(module.model))},
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", contract.in_channels, "height", "width"],
            "dtype": "float32",
            "channels": contract.in_channels,
            "modality": contract.modality,
            "streams": {k: list(v) for k, v in contract.stream_channels().items()} or None,
            "groups": input_groups(module),
        },
        "outputs": {
            head: {
                "name": head,
                "shape": ["batch", h.num_classes, "height", "width"],
                "class_names": list(h.class_names),
                "palette": [list(c) for c in h.palette],
            }
            for head, h in contract.heads.items()
        },
        "ignore_index": contract.ignore_index,
    }


def other_size(h: int, w: int) -> tuple[int, int]:
    """A second test size unlike the first in both sides, neither a multiple of 32."""
    h, w = h + 37, w + (-19 if w > 64 else 21)
    return h + 2 * (h % 32 == 0), w + 2 * (w % 32 == 0)


def normalize(x: torch.Tensor, module: FCNModule) -> torch.Tensor:
    """An input whose image groups are in 0..1 (N, C, H, W), normalised as the data does it."""
    transform = eval_transforms(
        normalization=list(module.input_normalizations), image_groups=module.contract.image_groups
    )
    return torch.stack([transform(tv_tensors.Image(s)).as_subclass(torch.Tensor) for s in x])


def random_input(module: FCNModule, n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Seeded: images uniform in 0..1 then normalised, depth 0.5 m to 10 m encoded, else N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, module.contract.in_channels, h, w, generator=g)
    for group in input_groups(module):
        a, b = group["channels"]
        if group["image"]:
            x[:, a:b] = torch.rand(n, b - a, h, w, generator=g)
        elif group["kind"] == "depth":
            mm = 500 + 9500 * torch.rand(n, b - a, h, w, generator=g)
            x[:, a:b] = mm.log() - (group["encoding"]["minus"] or 0.0)
    return normalize(x, module)


def test_inputs(module: FCNModule, image: Any) -> list[tuple[str, torch.Tensor]]:
    """(what, input) at two sizes: ``image`` and it resized, else random ones (batch 1, 2)."""
    if not image:
        sizes = [(1, *SIZE), (2, *other_size(*SIZE))]
        return [("random", random_input(module, *s, seed=i)) for i, s in enumerate(sizes)]
    path = Path(str(image)).expanduser()
    if module.contract.in_channels != 3:
        raise ConfigError(
            f"image={path}: the checkpoint takes {inputs_of(module.contract)}, not one image; "
            "leave image= out (a random input of its channels is used)"
        )
    pixels = read_image(path, exif_transpose=True)
    resized = TF.resize(pixels, list(other_size(*pixels.shape[-2:])), antialias=True)
    return [
        (path.name, normalize(pixels[None].float() / 255, module)),
        (f"{path.name} resized", normalize(resized[None].float() / 255, module)),
    ]


def size_oblivious() -> contextlib.AbstractContextManager:
    """Without it the graph guards on the example's sizes (a 1-pixel map) and refuses others."""
    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def writer(fmt: str, model: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any]) -> Any:
    """The function that writes the model, metadata included, to a binary file."""
    if fmt == "exported_program":
        d = torch.export.Dim.DYNAMIC
        with size_oblivious():
            ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: d, 2: d, 3: d}})
        text = json.dumps(meta)
        return lambda f: torch.export.save(ep, f, extra_files={EXTRA_FILE: text})
    onnx, _ = onnx_modules()
    with size_oblivious(), quiet("onnxscript", "onnx_ir", "torch.onnx"):
        proto = torch.onnx.export(
            model, (example,), dynamo=True, verbose=False,
            dynamic_shapes={"x": {0: "batch", 2: "height", 3: "width"}},
            input_names=[INPUT_NAME], output_names=list(model.head_names),
        ).model_proto  # fmt: skip
    meta["opset"] = next(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None
    )
    proto.doc_string = meta["model"]["arch"]
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    return lambda f: f.write(proto.SerializeToString())


class ExportedRunner:
    """Runs a written model file as its deployer would: name -> outputs; keeps its metadata."""

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


def compare(runner: ExportedRunner, model: torch.nn.Module, inputs: list, tolerance: float,
            rtol: float) -> list[str]:  # fmt: skip
    """Print a line per size and head; return the failures."""
    failures = []
    for what, x in inputs:
        with torch.no_grad():
            want = model(x)
        got = runner(x)
        size = "x".join(map(str, x.shape))
        for head, ref in want.items():
            out, at = got.get(head), f"input {size} ({what}), head {head}"
            if (shape := None if out is None else tuple(out.shape)) != tuple(ref.shape):
                failures.append(f"{at}: shape {shape}, wanted {tuple(ref.shape)}")
                print(failures[-1])
                continue
            empty = not ref.numel()
            diff = 0.0 if empty else float((out.float() - ref).abs().max())
            scale = 0.0 if empty else float(ref.abs().max())
            allowed = tolerance + rtol * scale
            labels = 0 if empty else int((out.argmax(1) != ref.argmax(1)).sum())
            line = (
                f"{at}: output {tuple(out.shape)}, max |diff| {diff:.3g} (logits up to "
                f"{scale:.3g}; allowed {allowed:.3g}); labels differ at {labels} pixel(s)"
            )
            print(line)
            if not diff <= allowed:  # NaN fails too
                failures.append(line)
            if float(ref.amax() - ref.amin()) == 0:
                print(f"  note: the checkpoint's {head} logits are constant here (untrained?)")
    return failures


def write_and_verify(f: IO[bytes], write: Callable[[IO[bytes]], Any], fmt: str,
                     meta: dict[str, Any], module: FCNModule, inputs: list,
                     cfg: DictConfig) -> None:  # fmt: skip
    """Write the model to the temporary ``f``, run it from there and compare (ExportError)."""
    write(f)
    f.flush()
    runner = ExportedRunner(Path(f.name), fmt, list(module.contract))
    if runner.metadata is None or json.loads(runner.metadata) != meta:
        raise ExportError(f"the exported model's metadata did not survive writing ({fmt})")
    failures = compare(runner, module.model, inputs, *allowance(cfg))
    if failures:
        raise ExportError(
            f"the exported model differs from the checkpoint's ({len(failures)} failure(s)):\n"
            + "\n".join(f"  {line}" for line in failures)
            + "\nnothing was written (tolerance=, rtol= set what is allowed)"
        )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s network to ``cfg.output``, verified; return the metadata."""
    fmt = cfg.get("format", "onnx")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {tuple(FORMATS)}, got {fmt!r}")
    allowance(cfg)
    if fmt == "onnx":
        onnx_modules()
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is not set: pass ckpt_path=/path/to/best.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    out = Path(str(cfg.get("output") or Path(cfg.paths.output_dir) / f"model{FORMATS[fmt]}"))
    out = out.expanduser()
    check_output(out, fmt, ckpt, bool(cfg.get("overwrite", False)))
    module = load_module(ckpt)
    inputs = test_inputs(module, cfg.get("image"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(module, ckpt, fmt, out)
    start = time.perf_counter()
    write = writer(fmt, module.model.eval(), random_input(module, *EXAMPLE, seed=2), meta)
    spec, took = module.model.spec, time.perf_counter() - start
    heads = ", ".join(f"{h} {n}" for h, n in spec.heads)
    print(f"exported {spec.arch} ({spec.backbone}, {spec.geometry} geometry; heads {heads}) to "
          f"{fmt} in {took:.1f} s")  # fmt: skip
    write_atomically(out, lambda f: write_and_verify(f, write, fmt, meta, module, inputs, cfg))
    write_json_atomic(sidecar_path(out), meta)
    print(f"written: {out} ({out.stat().st_size / 2**20:.1f} MiB) and {sidecar_path(out)}")
    return meta


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata inside an exported model file (either format)."""
    path = Path(path)
    fmt = next((f for f, s in FORMATS.items() if s == path.suffix.lower()), None)
    if fmt is None:
        raise ConfigError(f"{path}: not a {' or '.join(FORMATS.values())} file")
    return json.loads(ExportedRunner(path, fmt, []).metadata)
