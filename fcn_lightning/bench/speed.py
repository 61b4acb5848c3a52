"""Speed: training and inference of FCN-8s, in one process, with the card's name; its rows (a)
to (d) and what to compare them with: docs/PERFORMANCE.md.

    python -m fcn_lightning.bench            # on a GPU: the settings of docs/PERFORMANCE.md
    python -m fcn_lightning.bench --quick    # tiny sizes on any device (what the tests run)
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ..models import build_fcn
from ..module import FCNModule


@dataclass
class Setting:
    batch: int
    size: int
    width: float
    bf16: bool
    fast: bool  # channels_last + torch.compile + fused optimizer (GPU only)
    geometry: str = "paper"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call, after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Achieved TFLOP/s of an n x n matrix product: the ceiling rates are compared to."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, 3, 10)
    return 2 * n**3 / seconds / 1e12


def _arch(setting: Setting) -> dict[str, object]:
    return dict(arch="fcn8s", num_classes=21, width=setting.width, geometry=setting.geometry)


def forward_flops(setting: Setting) -> float:
    with torch.device("meta"):
        model = build_fcn(**_arch(setting)).eval()
        x = torch.empty(setting.batch, 3, setting.size, setting.size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _model(setting: Setting, device: torch.device, module: FCNModule | None = None):
    """FCN-8s (or ``module``'s) in train mode, its score layers non-zero so that all get grads."""
    model = (module.model if module is not None else build_fcn(**_arch(setting))).to(device)
    with torch.no_grad():
        for name, p in model.train().named_parameters():
            if name.split(".")[2].startswith("score"):  # score_fr, score_pool4, score_pool3
                p.normal_(std=0.01)
    return model


def train_step_fn(setting: Setting, device: torch.device, plain: bool) -> Callable[[], object]:
    """One SGD step. ``plain``: the textbook loop (no switches); else our module's loss and the
    speed switches that apply on this device."""
    gpu = device.type == "cuda"
    x = torch.randn(setting.batch, 3, setting.size, setting.size, device=device)
    y = torch.randint(0, 21, (setting.batch, setting.size, setting.size), device=device)
    module = None if plain else FCNModule(_arch(setting))
    model = _model(setting, device, module)
    params = model.parameters() if plain else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-10, momentum=0.99, fused=(gpu and setting.fast) or None)
    if setting.fast and gpu:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        model.compile()

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, setting.bf16 and not plain):
            out = model(x)
            loss = (
                F.cross_entropy(out["out"], y, ignore_index=255)
                if plain
                else module.loss(out, {"out": y})
            )
        loss.backward()
        opt.step()

    return step


def lightning_loop_rate(setting: Setting, device: torch.device, steps: int) -> float:
    """Images per second of a whole Lightning fit (in-memory data, metrics and logging on)."""
    n = setting.batch * (steps + 3)
    images = torch.randn(n, 3, setting.size, setting.size)
    labels = torch.randint(0, 21, (n, setting.size, setting.size))
    batches = [(images[i], {"out": labels[i]}) for i in range(n)]  # as the DataModules give them
    loader = DataLoader(batches, batch_size=setting.batch, pin_memory=device.type == "cuda")
    fused = (device.type == "cuda" and setting.fast) or None
    opt = {"name": "sgd", "lr": 1e-10, "momentum": 0.99, "fused": fused}
    mode = "default" if setting.fast else None
    module = FCNModule(_arch(setting), optimizer=opt, channels_last=setting.fast, compile=mode)
    timer = _StepTimer(warmup=3)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=device.type, devices=1, max_steps=steps + 3,
            precision="bf16-mixed" if setting.bf16 else "32-true",
            logger=pl.loggers.TensorBoardLogger(tmp, name="bench"), log_every_n_steps=10,
            callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, benchmark=device.type == "cuda",
        )  # fmt: skip
        # the val loader is given and skipped (limit_val_batches=0): the module has a
        # validation_step, and Lightning warns about one without a loader
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return timer.steps * setting.batch / max(timer.end - timer.start, 1e-9)


class _StepTimer(Callback):
    """Wall time of training steps after a warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps, self.end = warmup, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            _sync(pl_module.device)
            self.steps, self.end = self.steps + 1, time.perf_counter()


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.bench", description="FCN-8s training and inference speed"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: measures nothing")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu, quick = device.type == "cuda", args.quick
    iters = args.iters or (2 if quick else 30)
    card = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    w = 1 / 16 if quick else 1.0
    paper = Setting(1, 64 if quick else 500, w, bf16=False, fast=False)
    big = Setting(2 if quick else 8, 64 if quick else 512, w, bf16=True, fast=True)
    big_same = Setting(big.batch, big.size, w, bf16=True, fast=True, geometry="same")
    n = 256 if quick else 8192
    c32, c16 = (matmul_ceiling(device, t, n) for t in (torch.float32, torch.bfloat16))
    ceiling = {"fp32": c32, "bf16": c16}
    rows: list[dict[str, object]] = []

    def add(prefix: str, st: Setting, seconds: float, flops: float) -> None:
        mode = "bf16+fast" if st.bf16 and st.fast else ("bf16" if st.bf16 else "fp32")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
        tflops = flops / seconds / 1e12
        rows.append({
            "row": f"{prefix} {mode}, b{st.batch}, {st.size}px, {st.geometry}", "img_s": st.batch / seconds,
            "ms": seconds * 1e3, "tflops": tflops, "ceiling_share": tflops / ceiling["bf16" if st.bf16 else "fp32"], "peak_gib": peak,
        })  # fmt: skip
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)

    for prefix, setting, plain in (
        ("a  plain loop,", paper, True),
        ("b1 our step,", paper, False),
        ("b2 our step,", big, False),
        ("b3 our step,", big_same, False),
    ):
        step = train_step_fn(setting, device, plain)
        seconds = _timed(step, device, 2 if quick else 5, iters)
        add(prefix, setting, seconds, 3 * forward_flops(setting))
    rate = lightning_loop_rate(big, device, iters)
    add("c  Lightning,", big, big.batch / rate, 3 * forward_flops(big))
    for bf16 in (False, True):
        setting = Setting(1, paper.size, w, bf16=bf16, fast=bf16)
        model = _model(setting, device).eval()
        x = torch.randn(1, 3, setting.size, setting.size, device=device)
        if bf16 and gpu:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def infer(model=model, x=x, bf16=bf16):
            with torch.no_grad(), _autocast(device, bf16):
                return model(x)

        seconds = _timed(infer, device, 2 if quick else 10, iters * 2)
        add("d  inference,", setting, seconds, forward_flops(setting))
    base = rows[0]["img_s"]
    print(
        f"device: {card}; matmul ceiling fp32/tf32 {ceiling['fp32']:.1f}, bf16 {ceiling['bf16']:.1f} TFLOP/s"
        + ("; --quick: sizes are tiny, numbers mean nothing" if quick else "")
    )
    print(
        f"{'row':<46}{'img/s':>9}{'ms':>9}{'TFLOP/s':>9}{'ceiling':>9}{'peak GiB':>10}{'x (a)':>8}"
    )
    for r in rows:
        img = f"{r['img_s']:.1f}" if r["img_s"] else "-"
        ratio = f"{r['img_s'] / base:.2f}" if r["img_s"] and base else "-"
        print(f"{r['row']:<46}{img:>9}{r['ms']:>9.2f}{r['tflops']:>9.2f}{100 * r['ceiling_share']:>8.1f}%{r['peak_gib']:>10.2f}{ratio:>8}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
