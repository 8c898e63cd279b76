"""`raydiology bench scan`: the selective-scan implementations timed on the same inputs.

One scan shaped like a Vision Mamba layer's (u, Δ, z [B, Di, L]; B, C [B, N, L]; A, D, Δ-bias
as the mixer passes them), forward + backward, by the reference `selective_scan`, the
`chunked_selective_scan` (eager, and under torch.compile), and mamba-ssm's fused kernel where
it imports (CUDA only). Reports the median of `repeats` timed runs after a warm-up, the
speed-up over the reference measured in the same run, peak accelerator memory (CUDA only)
and the largest difference from the reference's output. Needs torch only (no Ray).

    python -m raydiology.bench.scan [--device cpu|cuda] [--batch B] [--length L] [--dim Di]
        [--state N] [--dtype bf16|fp32] [--repeats N] [--chunk T] [--compile|--no-compile]
        [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raydiology.bench import publish
from raydiology.models.mamba import (
    SCAN_CHUNK,
    chunked_selective_scan,
    cuda_selective_scan,
    selective_scan,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ScanFn = Callable[..., torch.Tensor]


def scan_inputs(
    *, batch: int, length: int, dim: int, state: int, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Leaf tensors (all requiring grad) the way `Mamba.scan` calls a scan: activations in
    `dtype`; A = -(1..N), D = 1 and the Δ bias (softplus(bias) log-uniform in [1e-3, 0.1])
    in float32, as mamba_ssm initialises them."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    tensors = {
        "u": randn(batch, dim, length).to(dtype),
        "delta": (randn(batch, dim, length) * 0.1).to(dtype),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).expand(dim, -1).contiguous(),
        "B": randn(batch, state, length).to(dtype),
        "C": randn(batch, state, length).to(dtype),
        "D": torch.ones(dim),
        "z": randn(batch, dim, length).to(dtype),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus^-1(dt)
    }
    return {k: v.to(device).requires_grad_() for k, v in tensors.items()}


def scan_implementations(
    device: torch.device, *, chunk: int, compile: bool
) -> tuple[dict[str, ScanFn], dict[str, str]]:
    """{name: scan} to time, reference first, and {name: why not} for those left out."""
    chunked = functools.partial(chunked_selective_scan, chunk=chunk)
    impls: dict[str, ScanFn] = {"reference": selective_scan, "chunked": chunked}
    skipped: dict[str, str] = {}
    if compile:
        impls["chunked+compile"] = torch.compile(chunked, dynamic=False)
    else:
        skipped["chunked+compile"] = "not asked for (--compile)"
    fused = cuda_selective_scan() if device.type == "cuda" else None
    if fused is not None:
        impls["mamba-ssm"] = fused
    else:
        skipped["mamba-ssm"] = (
            "CUDA only" if device.type != "cuda" else "mamba_ssm does not import here"
        )
    return impls, skipped


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(
    scan: ScanFn, inputs: dict[str, torch.Tensor], grad: torch.Tensor
) -> torch.Tensor:
    for x in inputs.values():
        x.grad = None
    y = scan(**inputs, delta_softplus=True)
    y.backward(grad)
    return y.detach()


def time_scan(
    scan: ScanFn,
    inputs: dict[str, torch.Tensor],
    grad: torch.Tensor,
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> tuple[list[float], int | None, torch.Tensor]:
    """Seconds of each timed forward + backward, peak CUDA memory (None elsewhere) and y."""
    y = grad
    for _ in range(warmup):  # compiles, autotunes, fills allocator caches
        y = _forward_backward(scan, inputs, grad)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = _forward_backward(scan, inputs, grad)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak, y


def run_scan_benchmark(
    *,
    device: str = "cpu",
    batch: int = 2,
    length: int = 196,
    dim: int = 192,
    state: int = 16,
    dtype: str = "fp32",
    repeats: int = 5,
    warmup: int = 1,
    chunk: int = SCAN_CHUNK,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Time every available scan on one set of inputs; `compile` None: on CUDA only (on a
    CPU the compile takes longer than the whole default run).

    Returns {"config": {...}, "results": {name: {"median_s", "times_s", "speedup" (reference
    median / this median), "peak_memory_bytes", "max_abs_diff"}}, "skipped": {name: why}}.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compile is None:
        compile = dev.type == "cuda"
    inputs = scan_inputs(
        batch=batch, length=length, dim=dim, state=state, dtype=DTYPES[dtype], device=dev
    )
    grad = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    grad = grad.to(device=dev, dtype=DTYPES[dtype])
    impls, skipped = scan_implementations(dev, chunk=chunk, compile=compile)

    results: dict[str, dict[str, Any]] = {}
    reference_y: torch.Tensor | None = None
    for name, scan in impls.items():
        try:
            times, peak, y = time_scan(
                scan, inputs, grad, repeats=repeats, warmup=warmup, device=dev
            )
        except Exception as e:  # a compile that fails here should not hide the other rows
            if name == "reference":
                raise
            skipped[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            continue
        y = y.float()
        if reference_y is None:
            reference_y = y
        results[name] = {
            "median_s": statistics.median(times),
            "times_s": times,
            "peak_memory_bytes": peak,
            "max_abs_diff": (y - reference_y).abs().max().item(),
        }
    base = results["reference"]["median_s"]
    for row in results.values():
        row["speedup"] = base / row["median_s"]
    config = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch": batch,
        "length": length,
        "dim": dim,
        "state": state,
        "dtype": dtype,
        "chunk": chunk,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return {"config": config, "results": results, "skipped": skipped}


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"selective scan, forward + backward, median of {c['repeats']}: batch {c['batch']}, "
        f"length {c['length']}, dim {c['dim']}, state {c['state']}, {c['dtype']}, "
        f"chunk {c['chunk']}, {c['device']}",
        f"{'scan':<18}{'median ms':>11}{'speed-up':>10}{'peak MiB':>10}{'max |y - ref|':>15}",
    ]
    for name, r in report["results"].items():
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(
            f"{name:<18}{r['median_s'] * 1e3:>11.1f}{r['speedup']:>9.2f}x{peak:>10}"
            f"{r['max_abs_diff']:>15.2e}"
        )
    lines += [f"{name:<18}skipped: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raydiology.bench.scan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=196, help="sequence length L")
    parser.add_argument("--dim", type=int, default=192, help="inner dim Di")
    parser.add_argument("--state", type=int, default=16, help="state size N")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=SCAN_CHUNK, help="chunked scan's steps")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile of the chunked scan (default: on CUDA only)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (1 times steadily on a busy machine)"
    )
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_scan_benchmark(
        device=args.device,
        batch=args.batch,
        length=args.length,
        dim=args.dim,
        state=args.state,
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        chunk=args.chunk,
        compile=args.compile,
    )
    publish(report, format_table(report), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
