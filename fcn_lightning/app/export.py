"""What export.py runs: a checkpoint's network as ONNX or an ExportedProgram, verified against the
checkpoint before it is renamed into place; docs/DEPLOYING.md describes the files and metadata."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import time
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
FORMAT_OF = {suffix: fmt for fmt, suffix in FORMATS.items()}
INPUT_NAME = "image"
METADATA_KEY = "fcn_lightning"  # ONNX metadata_props key; the .pt2's extra file is this + .json
EXTRA_FILE = f"{METADATA_KEY}.json"
SIZE = (75, 93)  # (H, W) of the first random input and of the traced example: not 1, not 32k


def onnx_modules() -> dict[str, Any]:
    """onnx, onnxscript (torch's exporter needs it) and onnxruntime, by name."""
    found = {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"format=onnx needs onnx, onnxscript and onnxruntime ({name} is "
                              'not installed): pip install -e ".[export]"') from None  # fmt: skip
    return found


def check_output(out: Path, sidecar: Path, fmt: str, ckpt: Path, overwrite: bool) -> None:
    """Refuse the checkpoint, a folder, another suffix, or (unless ``overwrite``) a file there."""
    suffix, ckpt_there = FORMATS[fmt], ckpt.exists()
    if any(os.path.samefile(p, ckpt) if ckpt_there and p.exists() else p.resolve() == ckpt.resolve()
           for p in (out, sidecar)):  # fmt: skip
        raise ConfigError(f"output={out} would write the checkpoint itself; pass e.g. "
                          f"output={ckpt.with_suffix(suffix)}")  # fmt: skip
    if out.is_dir():
        raise ConfigError(f"output={out} is a folder; output names the model file, e.g. "
                          f"output={out / ('model' + suffix)}")  # fmt: skip
    if out.suffix.lower() != suffix:
        other = FORMAT_OF.get(out.suffix.lower())
        raise ConfigError(f"output={out} does not end in {suffix}, the suffix of format={fmt}: "
                          f"pass output={out.with_suffix(suffix)}"
                          + (f", or format={other}" if other else ""))  # fmt: skip
    there = [str(p) for p in (out, sidecar) if os.path.lexists(p)]
    if there and not overwrite:
        raise ConfigError(f"{' and '.join(there)} already exist(s); refusing to overwrite: pass "
                          "overwrite=true, or another output=")  # fmt: skip
    if sidecar.is_dir():
        raise ConfigError(f"{sidecar} (the sidecar of output={out}) is a folder")


def input_groups(module: FCNModule) -> list[dict[str, Any]]:
    """The input's channel groups in order: kind, channels [from, to), normalisation or encoding."""
    norms, groups, at = iter(module.input_normalizations), [], 0
    for g in module.contract.inputs:
        group: dict[str, Any] = {"kind": g.kind, "stats": g.stats,
                                 "channels": [at, at + g.channels], "image": g.image}  # fmt: skip
        if g.image:
            norm = next(norms)
            group["normalization"] = {**norm.as_dict(), "unit_mean": norm.unit_mean,
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
    with open(ckpt, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return json.loads(json.dumps({  # tuples as lists
        "written_by": "fcn-lightning export", "format": fmt, "torch": torch.__version__,
        "model_file": out.name, "checkpoint": {"file": ckpt.name, "sha256": sha256},
        "model": {k: getattr(spec, k) for k in ("arch", "backbone", "width", "geometry")}
        | {"output_stride": max(output_strides(module.model))},
        "input": {
            "name": INPUT_NAME, "shape": ["batch", contract.in_channels, "height", "width"],
            "dtype": "float32", "channels": contract.in_channels, "modality": contract.modality,
            "streams": contract.stream_channels() or None,
            "groups": input_groups(module),
        },
        "outputs": {
            head: {"name": head, "shape": ["batch", h.num_classes, "height", "width"],
                   "class_names": h.class_names, "palette": h.palette}
            for head, h in contract.heads.items()
        },
        "ignore_index": contract.ignore_index,
    }))  # fmt: skip


def other_size(h: int, w: int) -> tuple[int, int]:
    """A second test size unlike the first in both sides, neither a multiple of 32."""
    h, w = h + 37, w + (-19 if w > 64 else 21)
    return h + 2 * (h % 32 == 0), w + 2 * (w % 32 == 0)


def normalize(x: torch.Tensor, module: FCNModule) -> torch.Tensor:
    """An input whose image groups are in 0..1 (N, C, H, W), normalised as the data does it."""
    norms, groups = list(module.input_normalizations), module.contract.image_groups
    transform = eval_transforms(normalization=norms, image_groups=groups)
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
        raise ConfigError(f"image={path}: the checkpoint takes {inputs_of(module.contract)}, not "
                          "one image; leave image= out (a random input of its channels is used)")  # fmt: skip
    pixels = read_image(path, exif_transpose=True)
    resized = TF.resize(pixels, list(other_size(*pixels.shape[-2:])), antialias=True)
    return [(what, normalize(p[None].float() / 255, module))
            for what, p in ((path.name, pixels), (f"{path.name} resized", resized))]  # fmt: skip


def writer(fmt: str, model: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any]) -> Any:
    """The function that writes the model, metadata included, to a binary file."""
    # without backed_size_oblivious the graph guards on the example's sizes and refuses others
    oblivious = {k: True for k in ["backed_size_oblivious"] if hasattr(fx_config, k)}
    with fx_config.patch(**oblivious), quiet("onnxscript", "onnx_ir", "torch.onnx"):
        if fmt == "exported_program":
            d = torch.export.Dim.DYNAMIC
            ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: d, 2: d, 3: d}})
            return lambda f: torch.export.save(ep, f, extra_files={EXTRA_FILE: json.dumps(meta)})
        proto = torch.onnx.export(
            model, (example,), dynamo=True, verbose=False,
            dynamic_shapes={"x": {0: "batch", 2: "height", 3: "width"}},
            input_names=[INPUT_NAME], output_names=list(model.head_names),
        ).model_proto  # fmt: skip
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    meta["opset"], proto.doc_string = (opsets or [None])[0], meta["model"]["arch"]
    onnx_modules()["onnx"].helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    return lambda f: f.write(proto.SerializeToString())


class ExportedRunner:
    """Runs a written model file as its deployer would: input -> outputs; keeps its metadata."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            ort = onnx_modules()["onnxruntime"]
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.metadata = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        else:
            extra = {EXTRA_FILE: ""}
            with open(path, "rb") as f:  # a file object: the temporary name does not end in .pt2
                self.program = torch.export.load(f, extra_files=extra).module()
            self.metadata = extra[EXTRA_FILE]

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fmt == "exported_program":
            return dict(self.program(x))
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, {INPUT_NAME: x.numpy()})
        return {h: torch.from_numpy(o) for h, o in zip(names, outs, strict=True)}


@torch.no_grad()
def compare(runner: ExportedRunner, model: torch.nn.Module, inputs: list, tolerance: float,
            rtol: float) -> None:  # fmt: skip
    """Print a line per size and head; raise ExportError listing the failures."""
    failures = []
    for what, x in inputs:
        want, got = model(x), runner(x)
        for head, ref in want.items():
            out, at = got.get(head), f"input {'x'.join(map(str, x.shape))} ({what}), head {head}"
            if (shape := None if out is None else tuple(out.shape)) != tuple(ref.shape):
                failures.append(f"{at}: shape {shape}, wanted {tuple(ref.shape)}")
                print(failures[-1])
                continue
            diff, scale = float((out.float() - ref).abs().max()), float(ref.abs().max())
            allowed = tolerance + rtol * scale
            labels = int((out.argmax(1) != ref.argmax(1)).sum())
            print(line := f"{at}: output {shape}, max |diff| {diff:.3g} (logits up to "
                          f"{scale:.3g}; allowed {allowed:.3g}); labels differ at {labels} pixel(s)")  # fmt: skip
            if not diff <= allowed:  # NaN fails too
                failures.append(line)
            if float(ref.amax() - ref.amin()) == 0:
                print(f"  note: the checkpoint's {head} logits are constant here (untrained?)")
    if failures:
        listed = "".join(f"\n  {line}" for line in failures)
        raise ExportError(f"the exported model differs from the checkpoint's ({len(failures)} "
                          f"failure(s)):{listed}\nnothing was written (tolerance=, rtol= set what "
                          "is allowed)")  # fmt: skip


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s network to ``cfg.output``, verified; return the metadata."""
    fmt = cfg.get("format", "onnx")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {tuple(FORMATS)}, got {fmt!r}")
    allowed = {name: cfg.get(name, d) for name, d in (("tolerance", 1e-4), ("rtol", 1e-5))}
    for name, value in allowed.items():
        with contextlib.suppress(TypeError, ValueError):
            if float(value) >= 0 and not isinstance(value, bool):
                continue
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    if fmt == "onnx":
        onnx_modules()
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is not set: pass ckpt_path=/path/to/best.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    out = cfg.get("output") or Path(cfg.paths.output_dir) / f"model{FORMATS[fmt]}"
    out = Path(str(out)).expanduser()
    sidecar = out.with_name(out.name + ".json")  # fcn8s.onnx.json: both formats fit in one folder
    check_output(out, sidecar, fmt, ckpt, bool(cfg.get("overwrite", False)))
    module = load_module(ckpt)
    inputs = test_inputs(module, cfg.get("image"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(module, ckpt, fmt, out)
    start = time.perf_counter()
    write = writer(fmt, module.model, random_input(module, 2, *SIZE, seed=2), meta)
    spec, took = module.model.spec, time.perf_counter() - start
    print(f"exported {spec.arch} ({spec.backbone}, {spec.geometry} geometry; heads "
          f"{', '.join(f'{h} {n}' for h, n in spec.heads)}) to {fmt} in {took:.1f} s")  # fmt: skip

    def write_and_verify(f: IO[bytes]) -> None:  # into the temporary file, run from there
        write(f)
        f.flush()
        runner = ExportedRunner(Path(f.name), fmt)
        if runner.metadata is None or json.loads(runner.metadata) != meta:
            raise ExportError(f"the exported model's metadata did not survive writing ({fmt})")
        compare(runner, module.model, inputs, *map(float, allowed.values()))

    write_atomically(out, write_and_verify)
    write_json_atomic(sidecar, meta)
    print(f"written: {out} ({out.stat().st_size / 2**20:.1f} MiB) and {sidecar}")
    return meta


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata inside an exported model file (either format)."""
    path = Path(path)
    if (fmt := FORMAT_OF.get(path.suffix.lower())) is None:
        raise ConfigError(f"{path}: not a {' or '.join(FORMATS.values())} file")
    return json.loads(ExportedRunner(path, fmt).metadata)
