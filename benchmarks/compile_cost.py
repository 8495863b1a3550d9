"""Wall time per pass and peak RSS of ``slmopt compile`` on a SmolLM2-135M-shaped Llama (random init).

Usage::

    python benchmarks/compile_cost.py                          # 30 layers, default "prune,fff", bench on
    python benchmarks/compile_cost.py --layers 2 --no-bench    # quick iteration on 2 layers
    python benchmarks/compile_cost.py --passes "prune,fff{distill_steps=30}" --json cost.json

The model has SmolLM2-135M's shape (hidden 576, SwiGLU 1536, 30 layers, 9 heads / 3 KV heads, vocab
49152, tied embeddings: 134.5M parameters) and random weights, so no download is needed; quality is not
measurable on it (``benchmarks/fff_quality.py`` is the quality reference). The compile runs as a new user
would run it (``python -m slmopt.cli compile``, the CLI defaults: 64 calibration windows of 256 token ids,
ONNX Runtime, parity check and latency bench on) in a child process; the peak RSS is the child's
``ru_maxrss``, cross-checked by polling ``/proc/<pid>/status`` VmHWM, and compared with 4x the fp32 size.
Per-pass seconds come from the compile's ``report.json``; ``phase_seconds`` splits the rest (load, lower,
verify, bench). Prints a table, then the JSON (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peak_memory import _vm_hwm_kib  # benchmarks/ (the script's folder): one /proc peak-RSS reader

__all__ = ["SMOLLM2_135M", "build_model_dir", "main", "measure", "table"]

DEFAULT_PASSES = "prune,fff"
LIMIT_FACTOR = 4.0  # issue 14: peak RSS <= 4x the model's fp32 size
SMOLLM2_135M: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def build_model_dir(folder: Path, layers: int, seed: int = 0) -> int:
    """Saves a random-init SmolLM2-135M-shaped Llama with ``layers`` blocks; returns its parameter count.

    Example:
        >>> # params = build_model_dir(Path("/tmp/m"), layers=2)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(SMOLLM2_135M | {"num_hidden_layers": layers}))).eval()
    model.save_pretrained(folder, safe_serialization=True)
    # Tied embeddings are stored once: count unique parameters (what the fp32 file holds).
    return sum(p.numel() for p in model.parameters())


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Builds the model, runs the compile in a child process and returns the figures."""
    model_dir, out = workdir / "model", Path(args.out) if args.out else workdir / "out"
    params = build_model_dir(model_dir, args.layers)
    calib = workdir / "calib.npy"
    ids = np.random.default_rng(0).integers(0, SMOLLM2_135M["vocab_size"], size=(args.samples, args.seq))
    np.save(calib, ids.astype(np.int64))
    cmd = [
        sys.executable, "-m", "slmopt.cli", "compile", str(model_dir), "--passes", args.passes,
        "--calib", str(calib), "--seq-len", str(args.seq), "--num-samples", str(args.samples),
        "--threads", str(args.threads), "--no-progress", "-q", "--force", "-o", str(out),
    ]  # fmt: skip
    if not args.bench:
        cmd.append("--no-bench")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    polled = 0
    while proc.poll() is None:
        polled = max(polled, _vm_hwm_kib(proc.pid))
        if time.perf_counter() - started > args.timeout:
            proc.kill()
        time.sleep(0.5)
    stderr = proc.stderr.read() if proc.stderr else ""
    seconds = time.perf_counter() - started
    # ru_maxrss of waited-for children, in KiB on Linux (this process has no other children).
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, polled) * 1024
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    passes = [{"pass": p["name"], "seconds": round(p["seconds"], 1)} for p in report.get("passes", [])]
    fff = next((p for p in report.get("passes", []) if p["name"] == "fff"), None)
    return {
        "model": f"SmolLM2-135M shape, {args.layers} layers, random init",
        "params": params,
        "fp32_bytes": params * 4,
        "pipeline": report.get("pipeline", args.passes),
        "calib": f"{args.samples}x{args.seq} token ids",
        "threads": args.threads,
        "latency_bench": args.bench,
        "exit_code": proc.returncode,
        "stderr_tail": stderr.strip().splitlines()[-3:],
        "wall_seconds": round(seconds, 1),
        "compile_seconds": round(report.get("seconds", 0.0), 1),
        "passes": passes,
        "phases": {k: round(v, 1) for k, v in report.get("phase_seconds", {}).items()},
        "fff_layers": [
            {k: r.get(k) for k in ("block", "steps", "seconds", "distill_seconds", "local_loss_after")}
            for r in (fff or {}).get("metrics", {}).get("layers", [])
        ],
        "latency": report.get("latency", {}),
        "peak_rss_bytes": peak,
        "peak_rss_over_fp32": round(peak / (params * 4), 2),
        "limit_factor": LIMIT_FACTOR,
        "within_limit": peak <= LIMIT_FACTOR * params * 4,
    }


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (one row per pass and phase)."""
    rows = ["| step | seconds |", "|---|---|"]
    rows += [f"| pass `{p['pass']}` | {p['seconds']} |" for p in result["passes"]]
    rows += [f"| {name} | {s} |" for name, s in result["phases"].items()]
    rows += [f"| **wall (child process)** | **{result['wall_seconds']}** |"]
    gib = 2**30
    return (
        f"{result['model']}: {result['params'] / 1e6:.1f}M params, fp32 {result['fp32_bytes'] / gib:.2f} GiB; "
        f"`{result['pipeline']}`, exit {result['exit_code']}\n"
        + "\n".join(rows)
        + f"\npeak RSS {result['peak_rss_bytes'] / gib:.2f} GiB = {result['peak_rss_over_fp32']}x fp32 "
        f"(limit {LIMIT_FACTOR}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passes", default=DEFAULT_PASSES, help=f"pipeline ({DEFAULT_PASSES})")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30 = the real shape)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (64, the CLI default)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per window (256, the CLI default)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the compile (2)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="kill the compile after (s)")
    parser.add_argument("--no-bench", dest="bench", action="store_false",
                        help="skip the compile's latency bench (on by default, as in the CLI)")  # fmt: skip
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--out", help="keep the compiled folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    with tempfile.TemporaryDirectory(prefix="slmopt-cost-") as tmp:
        result = measure(args, Path(tmp))
    print(table(result))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["exit_code"] == 0 and result["within_limit"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
