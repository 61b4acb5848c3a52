"""What export.py runs: a checkpoint's network as ONNX or an ExportedProgram, verified against the
checkpoint before it is renamed into place; docs/DEPLOYING.md describes the files and metadata.
A failure at any point (an output folder it cannot write, the check, a full disk) leaves nothing
new: no model, no sidecar, no folder the export made."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
import torch.fx.experimental._config as fx_config
from omegaconf import DictConfig
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ..atomic import write_atomically, write_json_atomic
from ..contract import inputs_of
from ..data.readers import read_image
from ..data.transforms import eval_transforms
from ..errors import ConfigError, ExportError
from ..models.stitch import output_strides
from ..module import FCNModule
from ..normalization import LOG_DEPTH_MEANS
from . import console
from .common import load_module, quiet

FORMATS = {"onnx": ".onnx", "exported_program": ".pt2"}
FORMAT_OF = {suffix: fmt for fmt, suffix in FORMATS.items()}
INPUT_NAME = "image"
METADATA_KEY = "fcn_lightning"  # ONNX metadata_props key; the .pt2's extra file is this + .json
EXTRA_FILE = f"{METADATA_KEY}.json"
SIZE = (75, 93)  # (H, W) of the first random input and of the traced example: not 1, not 32k
READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# the check's allowance is tolerance x the logits' spread (their standard deviation) + rtol x
# their largest |value|; the spread is taken as at least this (constant logits: 0)
SPREAD_FLOOR = float(torch.finfo(torch.float32).tiny)


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


def cause(err: OSError) -> str:
    """What an OSError says, "disk full" first where it is one."""
    why = err.strerror or str(err)
    return f"disk full: {why}" if err.errno in DISK_FULL else why


def unwritable(folder: Path, err: OSError) -> str:
    """``<folder> is read-only (...)`` or ``<folder> is not writable (...)``."""
    if err.errno in READ_ONLY:
        return f"{folder} is read-only ({err.strerror})"
    return f"{folder} is not writable ({cause(err)})"


def remove_folders(created: list[Path]) -> None:
    """Remove the folders the export made (outermost first in ``created``) that are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


def make_output_folder(folder: Path) -> list[Path]:
    """Create ``folder`` where missing and write and remove a small temporary file there; return
    the folders made (outermost first). ConfigError, with nothing made left, where it cannot."""
    missing, at = [], folder
    while not at.exists() and not at.is_symlink() and at != at.parent:
        missing.append(at)
        at = at.parent
    hint = ": choose another output= (in a folder you can write, on a disk with space)"
    created: list[Path] = []
    try:
        for new in reversed(missing):
            try:
                new.mkdir()
            except OSError as err:
                raise ConfigError(f"output folder {folder} cannot be created: "
                                  f"{unwritable(new.parent, err)}{hint}") from None  # fmt: skip
            created.append(new)
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".export-check-") as probe:
                probe.write(b"\0" * 4096)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as err:
            raise ConfigError(f"output folder {unwritable(folder, err)}{hint}") from None
    except BaseException:
        remove_folders(created)
        raise
    return created


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An error of the file system while ``path`` is written (a full disk, a read-only folder, a
    file-size limit): ConfigError naming it."""
    try:
        yield
    except OSError as err:
        named = {**dict.fromkeys(DISK_FULL, "disk full"),
                 **dict.fromkeys(READ_ONLY, "its folder is read-only")}.get(err.errno)  # fmt: skip
        why = f"{named} ({err.strerror})" if named else (err.strerror or str(err))
        raise ConfigError(f"could not write {path}: {why}; nothing was written: free some space "
                          "or choose another output=") from None  # fmt: skip


class Phases:
    """A bar over the export's phases on stderr (a terminal only), the phase's name and the
    elapsed time kept current while one runs for minutes (ONNX: translating a large net)."""

    def __init__(self, total: int) -> None:
        self.bar: Any = None
        self.done, self.started = threading.Event(), False
        if console.on_terminal():
            self.bar = tqdm(total=total, desc="start", file=sys.stderr, leave=False,
                            dynamic_ncols=True,
                            bar_format="export: {desc} | phase {n_fmt}/{total_fmt} done "
                                       "|{bar:12}| {elapsed}")  # fmt: skip
            self.thread = threading.Thread(target=self._keep_current, daemon=True)
            self.thread.start()

    def _keep_current(self) -> None:
        while not self.done.wait(1.0):
            self.bar.refresh()

    def __call__(self, name: str) -> None:
        """Phase ``name`` starts (the one before it is done)."""
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_description_str(name)

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.bar is not None:
            self.thread.join()
            self.bar.close()


def echo(text: str) -> None:
    """``print``, around a bar on the console (it is cleared, then drawn again below)."""
    if not getattr(tqdm, "_instances", None):
        print(text)
        return
    with tqdm.external_write_mode():
        print(text)


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


def writer(fmt: str, model: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any],
           phase: Callable[[str], None] = lambda name: None) -> Any:  # fmt: skip
    """The function that writes the model, metadata included, to a binary file; ``phase`` hears
    of each step (export the graph, and for ONNX translate it)."""
    # without backed_size_oblivious the graph guards on the example's sizes and refuses others
    oblivious = {k: True for k in ["backed_size_oblivious"] if hasattr(fx_config, k)}
    with fx_config.patch(**oblivious), quiet("onnxscript", "onnx_ir", "torch.onnx"):
        phase("export the graph")
        d = torch.export.Dim.DYNAMIC
        ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: d, 2: d, 3: d}})
        if fmt == "exported_program":
            return lambda f: torch.export.save(ep, f, extra_files={EXTRA_FILE: json.dumps(meta)})
        phase("translate to ONNX")
        proto = torch.onnx.export(
            ep, (example,), dynamo=True, verbose=False,
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


def label_agreement(out: torch.Tensor, ref: torch.Tensor, allowed: float) -> tuple[int, int]:
    """(pixels whose label differs, those of them that are no ties): a tie is a pixel where the
    checkpoint's top two logits are within ``allowed`` of each other."""
    flipped = out.argmax(1) != ref.argmax(1)
    if ref.shape[1] < 2:
        return 0, 0
    top = ref.topk(2, dim=1).values
    ties = (top[:, 0] - top[:, 1]) <= allowed
    return int(flipped.sum()), int((flipped & ~ties).sum())


@torch.no_grad()
def compare(runner: ExportedRunner, model: torch.nn.Module, inputs: list, tolerance: float,
            rtol: float, say: Callable[[str], None] = print) -> None:  # fmt: skip
    """Say a line per size and head; raise ExportError listing the failures. A head passes when
    its shape is the checkpoint's, max |diff| <= tolerance x the spread (standard deviation) of
    the checkpoint's logits + rtol x their largest |value|, and the labels (argmax) agree at
    every pixel but ties (:func:`label_agreement`): tiny logits pass nothing for being tiny."""
    failures = []
    for what, x in inputs:
        want, got = model(x), runner(x)
        for head, ref in want.items():
            out, at = got.get(head), f"input {'x'.join(map(str, x.shape))} ({what}), head {head}"
            if (shape := None if out is None else tuple(out.shape)) != tuple(ref.shape):
                failures.append(f"{at}: shape {shape}, wanted {tuple(ref.shape)}")
                say(failures[-1])
                continue
            out, ref64 = out.float(), ref.double()
            diff, scale = float((out - ref).abs().max()), float(ref.abs().max())
            spread = float(ref64.std(correction=0))
            allowed = tolerance * max(spread, SPREAD_FLOOR) + rtol * scale
            labels, not_ties = label_agreement(out, ref, allowed)
            line = (f"{at}: output {shape}, max |diff| {diff:.3g} (logits' spread {spread:.3g}, "
                    f"up to {scale:.3g}; allowed {allowed:.3g}); labels differ at {labels} "
                    "pixel(s)")  # fmt: skip
            if labels:
                line += f", {labels - not_ties} of them ties (top two logits within the allowed)"
            say(line)
            why = [] if diff <= allowed else ["max |diff| above the allowed"]  # NaN fails too
            if not_ties:
                why.append(f"labels differ at {not_ties} pixel(s) that are no ties")
            if why:
                failures.append(f"{line}: {'; '.join(why)}")
            if float(ref.amax() - ref.amin()) == 0:
                say(f"  note: the checkpoint's {head} logits are constant here (untrained?)")
    if failures:
        listed = "".join(f"\n  {line}" for line in failures)
        raise ExportError(f"the exported model differs from the checkpoint's ({len(failures)} "
                          f"failure(s)):{listed}\nnothing was written (allowed: tolerance x the "
                          "spread of the checkpoint's logits + rtol x their largest |value|, "
                          "and the same labels but at ties; tolerance=, rtol= set them)")  # fmt: skip


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
    created = make_output_folder(out.parent)
    try:
        return export_into(cfg, fmt, ckpt, out, sidecar, [float(v) for v in allowed.values()])
    except BaseException:
        remove_folders(created)
        raise


def export_into(cfg: DictConfig, fmt: str, ckpt: Path, out: Path, sidecar: Path,
                allowed: list[float]) -> dict[str, Any]:  # fmt: skip
    """:func:`export` once the output folder is there and writable."""
    module = load_module(ckpt)
    inputs = test_inputs(module, cfg.get("image"))
    meta = metadata(module, ckpt, fmt, out)
    old_sidecar = sidecar.read_bytes() if sidecar.is_file() else None  # overwrite=true
    sidecar_written = False
    with Phases(5 if fmt == "onnx" else 4) as phase:
        start = time.perf_counter()
        write = writer(fmt, module.model, random_input(module, 2, *SIZE, seed=2), meta, phase)
        spec, took = module.model.spec, time.perf_counter() - start
        echo(f"exported {spec.arch} ({spec.backbone}, {spec.geometry} geometry; heads "
             f"{', '.join(f'{h} {n}' for h, n in spec.heads)}) to {fmt} in {took:.1f} s")  # fmt: skip

        def write_and_verify(f: IO[bytes]) -> None:  # into the temporary file, run from there
            nonlocal sidecar_written
            phase("write the model")
            write(f)
            f.flush()
            phase(f"check on {len(inputs)} inputs")
            runner = ExportedRunner(Path(f.name), fmt)
            if runner.metadata is None or json.loads(runner.metadata) != meta:
                raise ExportError(f"the exported model's metadata did not survive writing ({fmt})")
            compare(runner, module.model, inputs, *allowed, say=echo)
            phase("put in place")
            with writing(sidecar):  # before the model's rename: a failure leaves the old pair
                write_json_atomic(sidecar, meta)
            sidecar_written = True

        try:
            with writing(out):
                write_atomically(out, write_and_verify)
        except BaseException:
            if sidecar_written:  # the model's rename failed: the sidecar as it was
                with contextlib.suppress(OSError):
                    if old_sidecar is None:
                        sidecar.unlink(missing_ok=True)
                    else:
                        write_atomically(sidecar, lambda f: f.write(old_sidecar))
            raise
        phase("done")
    echo(f"written: {out} ({out.stat().st_size / 2**20:.1f} MiB) and {sidecar}")
    return meta


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata inside an exported model file (either format)."""
    path = Path(path)
    if (fmt := FORMAT_OF.get(path.suffix.lower())) is None:
        raise ConfigError(f"{path}: not a {' or '.join(FORMATS.values())} file")
    return json.loads(ExportedRunner(path, fmt).metadata)
