"""Op-level GPU benchmark: ``slmopt::fff`` (fff.cu's CUDA kernel) vs a dense FFN of the same width (cuBLAS).

Shapes: bench_fff.py's BERT-base pair (h = 768, dense GELU FFN w = 3072 vs UltraFastBERT 1×11 and FFF
depth 4 × 192) plus an LLM-sized gated pair (h = 2048, SwiGLU w = 8192 vs FFF depth 5 × 256 gated SiLU
leaves: 32 · 256 = 8192 neurons). Batch 1 (memory/launch-bound) and 16384 (compute-bound), fp32 and fp16.
Dense = ``F.linear`` calls (cuBLAS; fp32 without TF32, torch's default). Timing: CUDA events around each
call, warm-up first, median of many calls, rotating over several weight/input sets so a set that fits the
50 MB L2 is not re-read from cache. Each row also gives the kernel's relative error against
``fff_reference`` in fp32 on the same values (routing near-ties can flip a few tokens in fp16).

Usage:
    python benchmarks/bench_fff_gpu.py --json out/bench_fff_gpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from slmopt import ops

# name: (h, dense width, activation, gated, levels, leaf width, node_out)
CONFIGS = {
    "bert768/ufb1x11": (768, 3072, "gelu", False, 12, 0, True),
    "bert768/fff4x192": (768, 3072, "gelu", False, 4, 192, False),
    "llm2048/fff5x256-swiglu": (2048, 8192, "silu", True, 5, 256, False),
}
ACT = {"gelu": F.gelu, "silu": F.silu}


def weights(cfg: tuple, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor | None]:
    h, w, _, gated, levels, width, node_out = cfg
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * fan_in**-0.5).to(dtype)

    n, e = 2**levels - 1, 2**levels
    p: dict[str, torch.Tensor | None] = {
        "dense_up": rnd(w, h, fan_in=h), "dense_gate": rnd(w, h, fan_in=h) if gated else None,
        "dense_down": rnd(h, w, fan_in=w), "node_w": rnd(n, h, fan_in=h), "node_b": rnd(n, fan_in=100),
        "node_out": rnd(n, h, fan_in=h) if node_out else None,
    }  # fmt: skip
    if width:
        p.update(leaf_w1=rnd(e, width, h, fan_in=h), leaf_wg=rnd(e, width, h, fan_in=h) if gated else None)
        p.update(leaf_w2=rnd(e, width, h, fan_in=width), leaf_b2=rnd(e, h, fan_in=100))
    return p


def fff_call(p: dict, act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    args = [p.get(k) for k in ("node_w", "node_b", "node_out", "leaf_w1", "leaf_b1", "leaf_wg", "leaf_bg")]
    args += [p.get("leaf_w2"), p.get("leaf_b2")]
    return lambda x: torch.ops.slmopt.fff(x, *args, act)


def dense_call(p: dict, act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = ACT[act]
    if p["dense_gate"] is not None:
        return lambda x: F.linear(
            fn(F.linear(x, p["dense_gate"])) * F.linear(x, p["dense_up"]), p["dense_down"]
        )
    return lambda x: F.linear(fn(F.linear(x, p["dense_up"])), p["dense_down"])


def median_ms(calls: list[Callable[[], object]], reps: int, warmup: int) -> float:
    """Median over reps of one call timed with CUDA events, cycling through `calls` (rotating data sets)."""
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(batches: list[int], dtypes: list[torch.dtype]) -> list[dict]:
    rows = []
    for name, cfg in CONFIGS.items():
        act = cfg[2]
        for dtype in dtypes:
            probe = weights(cfg, dtype, 0)
            set_bytes = sum(t.numel() * t.element_size() for t in probe.values() if t is not None)
            n_sets = max(1, min(6, math.ceil(200e6 / set_bytes)))  # > 4x the L2 in total
            sets = [probe] + [weights(cfg, dtype, s) for s in range(1, n_sets)]
            for batch in batches:
                xs = [torch.randn(batch, cfg[0], device="cuda").to(dtype) for _ in sets]
                fffs = [functools.partial(fff_call(p, act), x) for p, x in zip(sets, xs, strict=True)]
                denses = [functools.partial(dense_call(p, act), x) for p, x in zip(sets, xs, strict=True)]
                reps = 200 if batch <= 16 else 30
                fff_ms = median_ms(fffs, reps, warmup=10)
                dense_ms = median_ms(denses, reps, warmup=10)
                f32 = {k: (v.float() if v is not None else None) for k, v in sets[0].items()}
                y = fffs[0]().float()
                want = ops.fff_reference(xs[0].float(), *[f32.get(k) for k in ops.TENSOR_ARGS[1:]], act)
                rel = ((y - want).norm() / want.norm()).item()
                rows.append(
                    {"config": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                     "fff_ms": fff_ms, "dense_ms": dense_ms, "speedup": dense_ms / fff_ms, "rel_err": rel,
                     "data_sets": n_sets}
                )  # fmt: skip
                print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    return (
        f"| {r['config']:<24} | {r['dtype']:<7} | {r['batch']:>5} | {r['fff_ms']:>9.4f} | {r['dense_ms']:>9.4f} "
        f"| {r['speedup']:>7.2f}x | {r['rel_err']:.1e} |"
    )


HEADER = (
    "| config                   | dtype   | batch |  fff (ms) | dense (ms) | dense/fff | rel err |\n"
    "|--------------------------|---------|-------|-----------|-----------|----------|---------|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fff_gpu: no CUDA GPU")
    if not ops.load_cuda_kernel(verbose=False):
        raise SystemExit(f"bench_fff_gpu: the CUDA kernel did not build: {ops._cuda_state['error']}")
    dev = torch.cuda.get_device_properties(0)
    print(
        f"# {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    print(HEADER, flush=True)
    rows = run(args.batches, [getattr(torch, d) for d in args.dtypes])
    print("\n" + HEADER + "\n" + "\n".join(_fmt(r) for r in rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": dev.name, "torch": torch.__version__, "cuda": torch.version.cuda}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
