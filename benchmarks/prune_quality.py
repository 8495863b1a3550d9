"""Attention-layer pruning on tinylm: held-out quality by selection rule and recovery, ORT latency.

Usage::

    python benchmarks/prune_quality.py [--model ~/.cache/slmopt/tinylm] [--calib-samples 64]
        [--eval-windows 128] [--threads 1] [--out DIR] [--json out.json]

Rows (all remove a quarter of the attention layers — 1 of tinylm's 4 — with layer 0 protected):

* ``original``;
* the layer chosen by ``cosine`` (and, for comparison, by ``loss`` and ``kl``), no recovery;
* ``random`` — the mean of 5 seeded uniform draws among the *unprotected* layers (1..3); with only three
  candidates draws repeat, so the exact expectation over the three (``random (all 3)``) is shown too;
* the ``cosine`` choice with ``bias`` and ``lowrank`` recovery (rank 32 and full rank).

Quality is bits per byte on contiguous 256-byte windows of ``heldout.txt`` (not seen in training or
calibration). Latency compares the original and the pruned model lowered to ONNX Runtime (CPU, same
threads, interleaved; :func:`slmopt.bench.compare_latency`). Prints a table, then the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tinylm_data import bits_per_byte  # benchmarks/ (the script's folder)

import slmopt.passes.prune_attention  # noqa: F401 - registers prune-attn (also listed in BUILTIN_PASSES)
from slmopt.data.windows import DataSpec, eval_windows, load_tokens
from slmopt.loaders import load_program
from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.parse import parse_pipeline
from slmopt.program import Program

__all__ = ["main", "run"]

log = logging.getLogger(__name__)
DEFAULT_MODEL = Path("~/.cache/slmopt/tinylm").expanduser()
SEQ = 256
RANDOM_DRAWS = 5


def _prune(program: Program, options: str, calib: torch.Tensor, extras: dict[str, Any] | None = None):
    ctx = PassContext(calib=calib, progress=False, **(extras or {}))  # typed PassContext fields
    new, reports = PassManager(parse_pipeline(f"prune-attn{{{options}}}")).run(program, ctx)
    return new, reports[0]


def _latency(original: Program, pruned: Program, threads: int, reps: int) -> dict[str, Any]:
    from slmopt.bench import compare_latency
    from slmopt.lowering import get_backend

    backend = get_backend("onnxruntime")
    engines, parity = {}, {}
    with tempfile.TemporaryDirectory(prefix="slmopt-prune-") as tmp:
        for name, program in (("original", original), ("pruned", pruned)):
            folder = Path(tmp) / name
            folder.mkdir()
            parity[name] = backend.lower(program, folder, {}).metadata.get("max_abs_diff")
            # Spinning ORT workers would steal the cores the other engine needs in the same round.
            engines[name] = backend.load(folder, threads=threads, allow_spinning=False)
        ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
        result = compare_latency(
            engines, (ids,), warmup=5, reps=reps, progress=False, config={"threads": threads}
        )
        return {
            "table": result.table(),
            "median_ms": {n: result.median(n) for n in engines},
            "pruned_over_original": result.ratio("pruned"),
            "onnx_vs_program_max_abs_diff": parity,
        }


class _Runner:
    """Runs pass variants on one Program; held-out quality cached by (layers removed, recovery)."""

    def __init__(self, program: Program, calib: torch.Tensor, heldout: torch.Tensor) -> None:
        self.program, self.calib, self.heldout = program, calib, heldout
        self.cache: dict[tuple, float] = {}
        self.rows: list[dict[str, Any]] = []

    def quality(self, options: str, extras: dict[str, Any] | None = None) -> tuple[Program, Any, float]:
        new, report = _prune(self.program, options, self.calib, extras)
        recover = next((o.split("=")[1] for o in options.split(",") if o.startswith("recover=")), "none")
        key = (tuple(report.metrics["removed"]), recover, options if recover != "none" else "")
        if key not in self.cache:
            self.cache[key] = bits_per_byte(new, self.heldout)
        return new, report, self.cache[key]

    def row(self, variant: str, removed: Any, bpb: float, params: int, kv: int, **extra: Any) -> None:
        self.rows.append({"variant": variant, "removed": removed, "bits_per_byte": bpb, "params": params,
                          "kv_bytes_per_token_fp32": kv, **extra})  # fmt: skip
        log.info("%-30s removed %-8s %.4f bits/byte", variant, removed, bpb)

    def variant(
        self, variant: str, options: str, extras: dict[str, Any] | None = None
    ) -> tuple[Program, Any]:
        new, report, bpb = self.quality(options, extras)
        kv = report.metrics["kv_cache_bytes_per_token"]["fp32"]["after"]
        self.row(variant, report.metrics["removed"], bpb, new.num_params(), kv, options=options)
        return new, report


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every variant; returns the JSON-ready result (rows, importance, sweep, costs, latency)."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    program, _ = load_program(args.model)
    calib = load_tokens(
        DataSpec(str(args.model / "calib.txt"), SEQ, args.calib_samples, seed=0), byte_level=True
    )
    heldout_data = eval_windows(args.model / "heldout.txt", SEQ, args.eval_windows, byte_level=True)
    heldout = heldout_data.tokens
    runner = _Runner(program, calib, heldout)

    extras: dict[str, Any] = {"eval_tokens": heldout_data}  # EvalData: tokens + bytes per token
    if args.out:
        extras["artifact_dir"] = Path(args.out)
    pruned, cosine = runner.variant("cosine", "remove=1,metric=cosine,sweep=true", extras)
    kv = cosine.metrics["kv_cache_bytes_per_token"]["fp32"]
    runner.row("original", [], cosine.metrics["quality"]["before"]["bits_per_byte"], program.num_params(),
               kv["before"], options="-")  # fmt: skip
    runner.rows.insert(0, runner.rows.pop())
    for metric in ("loss", "kl"):
        runner.variant(metric, f"remove=1,metric={metric}")

    # Random choices of the same size, drawn among the unprotected layers only (layer 0 is protected).
    free = [r["layer"] for r in cosine.metrics["importance"] if not r["protected"]]
    gen = torch.Generator().manual_seed(args.seed)
    draws = [free[int(torch.randint(len(free), (1,), generator=gen))] for _ in range(RANDOM_DRAWS)]
    by_layer = {k: runner.quality(f"layers={k}") for k in free}
    draw_bpb = [by_layer[k][2] for k in draws]
    params, kv_after = by_layer[free[0]][0].num_params(), kv["after"]
    mean_draws = sum(draw_bpb) / len(draw_bpb)
    runner.row(
        f"random (mean of {RANDOM_DRAWS} draws)",
        draws,
        mean_draws,
        params,
        kv_after,
        options=f"seed={args.seed}",
    )
    runner.row(f"random (exact mean over {free})", free, sum(q[2] for q in by_layer.values()) / len(free),
               params, kv_after, options="each once")  # fmt: skip
    for recover in ("bias", "lowrank,rank=32", f"lowrank,rank={program.info.config['hidden_size']}"):
        runner.variant(f"cosine + {recover.replace(',', ' ')}", f"remove=1,metric=cosine,recover={recover}")

    base = runner.rows[0]["bits_per_byte"]
    for row in runner.rows:
        row["delta_pct"] = 100 * (row["bits_per_byte"] / base - 1)
    return {
        "model": str(args.model),
        "calibration": {"windows": int(calib.shape[0]), "seq_len": SEQ},
        "heldout": {"windows": int(heldout.shape[0]), "seq_len": SEQ},
        "rows": runner.rows,
        "random_draws": {"layers": draws, "bits_per_byte": draw_bpb, "seed": args.seed},
        "by_layer_bits_per_byte": {k: q[2] for k, q in by_layer.items()},
        "importance": cosine.metrics["importance"],
        "sweep": [{k: r[k] for k in ("removed", "layers", "bits_per_byte")} for r in cosine.metrics["sweep"]],
        "costs": {
            k: cosine.metrics[k] for k in ("params", "attention_flops_per_token", "kv_cache_bytes_per_token")
        },
        "plots": cosine.metrics.get("plots", []),
        "latency": _latency(program, pruned, args.threads, args.reps),
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(result: dict[str, Any]) -> str:
    """The quality rows as an aligned text table, then importance, sweep and the latency table."""
    head = ("variant", "removed", "bits/byte", "delta %", "params", "KV B/token fp32")
    lines = [head] + [
        (r["variant"], ",".join(map(str, r["removed"])) or "-", f"{r['bits_per_byte']:.4f}",
         f"{r['delta_pct']:+.2f}", f"{r['params']:,}", str(r["kv_bytes_per_token_fp32"]))
        for r in result["rows"]
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    imp = ", ".join(
        f"L{r['layer']}={r['score']:.4f}{' (protected)' if r['protected'] else ''}"
        for r in result["importance"]
    )
    sweep = ", ".join(f"{r['removed']} -> {r['bits_per_byte']:.4f}" for r in result["sweep"])
    flops = result["costs"]["attention_flops_per_token"]
    lat = result["latency"]
    return "\n".join([
        *out, "",
        f"cosine importance: {imp}",
        f"sweep, attention layers removed in cosine order -> bits/byte: {sweep}",
        f"attention FLOPs/token at context {flops['context']}: {flops['before']:,} -> {flops['after']:,}",
        "", f"ONNX Runtime CPU latency, batch 1 x {SEQ} tokens, {result['threads']} thread(s), interleaved:",
        lat["table"],
        "(max|diff| is vs the original engine: the pruned model computes a different function; "
        f"ORT vs its own torch Program: {lat['onnx_vs_program_max_abs_diff']})",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="tinylm folder (with calib/heldout.txt)"
    )
    parser.add_argument("--calib-samples", type=int, default=64, help="256-byte calibration windows")
    parser.add_argument("--eval-windows", type=int, default=128, help="256-byte held-out windows")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--reps", type=int, default=30, help="latency rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random layer draws")
    parser.add_argument("--out", type=Path, default=None, help="folder for the importance/sweep PNGs")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.model = args.model.expanduser()
    if not (args.model / "heldout.txt").is_file():
        print(
            f"error: {args.model} is not a tinylm folder (train it: examples/tinylm/train.py)",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    print(table(result))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
