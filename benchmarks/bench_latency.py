"""Latency of an original model vs compiled slmopt folders, side by side in one process, same threads.

Usage::

    python benchmarks/bench_latency.py ORIGINAL_MODEL COMPILED_DIR [COMPILED_DIR ...] \\
        --threads 1 --batch 1 --seq 128 --json out.json

``ORIGINAL_MODEL`` is anything ``slmopt.loaders`` reads (Hugging Face folder, ``.pt2``,
``module:factory``) or another slmopt output folder. The original is lowered to
the first folder's backend (see :func:`slmopt.bench.bench_model_vs_compiled`); every engine runs
interleaved in one comparison. Prints an aligned table; ``--json`` writes the full result.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from slmopt.bench import bench_model_vs_compiled

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("original", help="original model (HF folder, .pt2, module:factory, or slmopt folder)")
    parser.add_argument("compiled", nargs="+", help="slmopt output folder(s)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every engine")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--backend", default=None, help="runtime for the original (default: the folder's)")
    parser.add_argument("--json", default=None, help="write the full result (with samples) here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        result = bench_model_vs_compiled(
            args.original,
            args.compiled if len(args.compiled) > 1 else args.compiled[0],
            threads=args.threads,
            batch=args.batch,
            seq=args.seq,
            backend=args.backend,
            warmup=args.warmup,
            reps=args.reps,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
