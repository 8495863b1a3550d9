"""Elastic subnets on tinylm: held-out quality, size and ORT latency per budget, with/without distill.

Usage:
    python benchmarks/elastic_quality.py [--model ~/.cache/slmopt/tinylm] [--steps 150] [--threads 2]

Rows, all from one run of ``elastic{budgets=0.25,0.5,0.75}`` (importance order) plus the same budgets
with ``order=random``: parameters (fraction of the total, embeddings included), matmul FLOPs per token,
held-out bits/byte after extraction and after ``distill{mode=logits}``, and ONNX Runtime latency in ms per
token (batch 1, 8 tokens, median of 20, one process, same threads). Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tinylm_data import bits_per_byte, load_reference  # benchmarks/ (the script's folder)

from slmopt.passes.elastic.latency import measure_ms_per_token
from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.parse import parse_pipeline
from slmopt.program import Program

__all__ = ["main", "run"]

log = logging.getLogger(__name__)
DEFAULT_MODEL = Path("~/.cache/slmopt/tinylm").expanduser()
SEQ = 256
BUDGETS = (0.25, 0.5, 0.75)


def _elastic(program: Program, calib: torch.Tensor, order: str, distill: str) -> tuple[Any, Any]:
    budgets = ",".join(map(str, BUDGETS))
    text = f"elastic{{budgets={budgets},order={order}}}" + (f",{distill}" if distill else "")
    manager = PassManager(parse_pipeline(text))
    main, reports = manager.run(program, PassContext(calib=calib, progress=False))
    return manager.variants, reports[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    program, calib, heldout = load_reference(args.model, SEQ, args.calib_samples, args.eval_windows)
    total = program.num_params()
    rows = [{"variant": "original", "budget": 1.0, "params": total, "fraction": 1.0,
             "bits_per_byte": bits_per_byte(program, heldout), "bits_per_byte_distilled": None,
             "ms_per_token": measure_ms_per_token(program, "onnxruntime", args.threads)}]  # fmt: skip
    distill = f"distill{{mode=logits,steps={args.steps},seconds={args.seconds},lr={args.lr}}}"
    for order in ("importance", "random"):
        plain, report = _elastic(program, calib, order, "")
        distilled, _ = _elastic(program, calib, order, distill) if order == "importance" else ({}, None)
        for budget in BUDGETS:
            name = f"{budget:g}"
            sub = plain[name][0]
            info = report.metrics["subnets"][name]
            rows.append({
                "variant": order, "budget": budget, "params": sub.num_params(), "fraction": info["fraction"],
                "flops_per_token": info["flops_per_token"], "blocks": info["blocks"],
                "kv_groups": info["kv_groups"], "ffn": info["ffn"], "bits_per_byte": bits_per_byte(sub, heldout),
                "bits_per_byte_distilled": bits_per_byte(distilled[name][0], heldout) if distilled else None,
                "ms_per_token": measure_ms_per_token(sub, "onnxruntime", args.threads),
            })  # fmt: skip
            log.info("%s %s: %s", order, name, rows[-1])
    return {"model": str(args.model), "threads": args.threads, "steps": args.steps, "rows": rows,
            "seconds": time.perf_counter() - started}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    lines = ["variant     budget  params     frac   FLOPs/tok   bpb     bpb+distill  ms/token"]
    for r in result["rows"]:
        dist = f"{r['bits_per_byte_distilled']:.4f}" if r["bits_per_byte_distilled"] is not None else "-"
        lines.append(
            f"{r['variant']:<11} {r['budget']:<6} {r['params']:<10,} {r['fraction']:.3f}  "
            f"{r.get('flops_per_token', 0) or 0:<10,}  {r['bits_per_byte']:.4f}  {dist:<11}  "
            f"{r['ms_per_token']:.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
