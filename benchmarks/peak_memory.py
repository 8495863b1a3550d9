"""Peak resident memory of ``slmopt compile`` on a random-init model, compared with 4x its fp32 size.

Usage::

    python benchmarks/peak_memory.py                      # GPT-2-small shape (HF GPT2Config defaults, 124M)
    python benchmarks/peak_memory.py --size tiny          # a ~1M-parameter proxy (seconds)
    python benchmarks/peak_memory.py --passes "mask-2to4{method=magnitude}" --json out.json

"The full default pipeline" (``FULL_PIPELINE``) is every built-in pass with its default options and
calibration-driven methods, ordered so no pass undoes another (2:4 last: FFF replaces the FFN linears), except that FFF distillation is cut to 20 steps per layer (the step count
changes run time, not the memory held): ``prune-attn,fff{distill_steps=20},mask-2to4{method=sparsegpt}``,
calibrated on 16 windows of 128 random token ids, lowered to ONNX Runtime (parity check included, latency
benchmark skipped unless ``--bench``). The compile runs in a child process (``python -m slmopt.cli compile``); the peak RSS is
the child's ``ru_maxrss`` (``RUSAGE_CHILDREN``), cross-checked by polling ``/proc/<pid>/status`` VmHWM.
The model is built and saved by this (parent) process, so its own copy does not count.
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

__all__ = ["FULL_PIPELINE", "main", "measure"]

FULL_PIPELINE = "prune-attn,fff{distill_steps=20},mask-2to4{method=sparsegpt}"
LIMIT_FACTOR = 4.0  # the bound: peak RSS < 4x the model's fp32 size

# size name -> GPT2Config overrides (empty = the HF defaults: 12 layers, 768 wide, vocab 50257, 124M)
SIZES: dict[str, dict[str, Any]] = {
    "gpt2-small": {},
    "tiny": {
        "vocab_size": 512,
        "n_positions": 128,
        "n_embd": 128,
        "n_layer": 2,
        "n_head": 4,
        "bos_token_id": 511,
        "eos_token_id": 511,
    },
}


def build_model_dir(size: str, folder: Path, seed: int = 0) -> int:
    """Saves a random-init GPT-2 of ``size`` (safetensors) into ``folder``; returns its parameter count."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**SIZES[size])
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    # Tied embeddings are stored once; count unique parameters (what the fp32 file holds).
    return sum(p.numel() for p in model.parameters())


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(
    size: str,
    passes: str,
    samples: int,
    seq: int,
    threads: int,
    workdir: Path,
    timeout: float,
    backend_options: tuple[str, ...] = (),
    bench: bool = False,
) -> dict[str, Any]:
    """Builds the model, runs the compile in a child process and returns the figures."""
    model_dir = workdir / "model"
    params = build_model_dir(size, model_dir)
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    calib = workdir / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, vocab, size=(samples, seq), dtype=np.int64))
    cmd = [
        sys.executable, "-m", "slmopt.cli", "compile", str(model_dir), "--passes", passes,
        "--calib", str(calib), "--seq-len", str(seq), "--num-samples", str(samples),
        "--threads", str(threads), "--no-progress", "-q", "-o", str(workdir / "out"),
    ]  # fmt: skip
    if not bench:
        cmd.append("--no-bench")
    for option in backend_options:
        cmd += ["--backend-option", option]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    polled = 0
    while proc.poll() is None:
        polled = max(polled, _vm_hwm_kib(proc.pid))
        if time.perf_counter() - started > timeout:
            proc.kill()
        time.sleep(0.5)
    stderr = proc.stderr.read() if proc.stderr else ""
    seconds = time.perf_counter() - started
    # ru_maxrss of waited-for children, in KiB on Linux (this process has no other children).
    peak_kib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, polled)
    fp32 = params * 4
    return {
        "size": size,
        "params": params,
        "fp32_bytes": fp32,
        "pipeline": passes,
        "backend_options": list(backend_options),
        "latency_bench": bench,
        "calib": f"{samples}x{seq} token ids",
        "threads": threads,
        "exit_code": proc.returncode,
        "stderr_tail": stderr.strip().splitlines()[-3:],
        "seconds": round(seconds, 1),
        "peak_rss_bytes": peak_kib * 1024,
        "peak_rss_over_fp32": round(peak_kib * 1024 / fp32, 2),
        "limit_factor": LIMIT_FACTOR,
        "within_limit": peak_kib * 1024 < LIMIT_FACTOR * fp32,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt2-small", help="model shape")
    parser.add_argument("--passes", default=FULL_PIPELINE, help=f"pipeline ({FULL_PIPELINE})")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (16)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per window (128)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the compile (2)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="kill the compile after (s)")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to slmopt compile, e.g. external_data=true (repeatable)")  # fmt: skip
    parser.add_argument("--bench", action="store_true",
                        help="keep the compile's latency bench (original vs compiled in ORT) on")  # fmt: skip
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slmopt-mem-") as tmp:
        result = measure(
            args.size, args.passes, args.samples, args.seq, args.threads, Path(tmp), args.timeout,
            tuple(args.backend_option), args.bench,
        )  # fmt: skip
    gib = 2**30
    print(
        f"{result['size']}: {result['params'] / 1e6:.1f}M params, fp32 {result['fp32_bytes'] / gib:.2f} GiB, "
        f"peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB = {result['peak_rss_over_fp32']}x fp32 "
        f"(limit {LIMIT_FACTOR}x), exit {result['exit_code']}, {result['seconds']} s"
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["exit_code"] == 0 and result["within_limit"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
