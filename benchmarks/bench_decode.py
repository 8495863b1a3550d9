"""Decode with a KV cache vs recompute, and a compiled model's prefill/decode cost vs the original.

Usage::

    python benchmarks/bench_decode.py --model ~/.cache/slmopt/tinylm --compiled out/prune-fff \\
        --threads 1 --context 512 --reps 20 --json decode.json

(a) One new token at ``--context`` cached positions: the original model's ``decoder.onnx`` step vs
running its ``model.onnx`` on the whole context again (what a runtime without a cache pays per token).
(b) With ``--compiled`` (an slmopt output folder, e.g. ``slmopt compile MODEL --passes prune-attn,fff``):
prefill tokens/s at 128/512/2048 prompt tokens (lengths beyond the context are skipped), decode ms/token
at batch 1 and 8 with ``--context`` cached positions, and KV bytes per token, original vs compiled, see
:func:`slmopt.generation.bench.bench_generation`. Everything runs in ONNX Runtime (CPU) in one process,
interleaved round-robin, same threads; medians and ratios are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from slmopt.backends.onnxrt.backend import OnnxRuntimeBackend
from slmopt.generation.bench import bench_cache_vs_recompute, bench_generation
from slmopt.loaders import load_program

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(Path("~/.cache/slmopt/tinylm").expanduser()), help="original")
    parser.add_argument("--compiled", help="slmopt output folder to compare with the original (part b)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every engine (1)")
    parser.add_argument("--context", type=int, default=512, help="cached positions when decoding (512)")
    parser.add_argument("--reps", type=int, default=20, help="recorded rounds per measurement (20)")
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.no_progress
    figures: dict = {"threads": args.threads, "context": args.context, "reps": args.reps}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
            # The original lowered once: model.onnx (recompute) and decoder.onnx (cache) side by side.
            OnnxRuntimeBackend().lower(load_program(args.model)[0], Path(tmp), {"generation": True})
            cache = bench_cache_vs_recompute(
                tmp, context=args.context, threads=args.threads, reps=args.reps, progress=progress
            )
            figures["cache_vs_recompute"] = cache
            print(
                f"(a) decode 1 token at context {args.context}, {args.threads} thread(s): recompute "
                f"{cache['recompute_ms']:.2f} ms, KV cache {cache['cached_ms']:.2f} ms -> "
                f"{cache['speedup']:.1f}x faster (max |diff| {cache['max_abs_diff']:.1e})"
            )
            if args.compiled:
                result = bench_generation(
                    tmp,
                    args.compiled,
                    threads=args.threads,
                    context=args.context,
                    reps=args.reps,
                    progress=progress,
                )
                figures["original_vs_compiled"] = result.to_dict()
                print(f"(b) original vs {args.compiled}:\n{result.table()}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
