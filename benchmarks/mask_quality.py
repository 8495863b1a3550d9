"""2:4 masking quality on the tinylm reference model: held-out bits per byte for each method.

Each method is compiled with the public API (the same path as `slmopt compile`), lowered to ONNX Runtime,
and the quality is measured on the *engine* against the original program on the same held-out windows.

Run:
    python benchmarks/mask_quality.py [--model ~/.cache/slmopt/tinylm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import slmopt

METHODS = ("magnitude", "wanda", "sparsegpt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/slmopt/tinylm")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows of 256 bytes")
    parser.add_argument("--eval-samples", type=int, default=128, help="held-out windows of 256 bytes")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        print(
            f"no model at {args.model}: run `make demo` (or examples/tinylm/train.py) first", file=sys.stderr
        )
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="slmopt-mask-") as tmp:
        for method in METHODS:
            started = time.perf_counter()
            result = slmopt.compile(
                args.model,
                passes=f"mask-2to4{{method={method}}}",
                calib=str(args.model / "calib.txt"),
                eval=str(args.model / "heldout.txt"),
                num_samples=args.num_samples,
                eval_samples=args.eval_samples,
                output_dir=Path(tmp) / method,
                bench=False,
                progress=False,
            )
            quality = result.report.quality
            before, after = quality["before"]["bits_per_byte"], quality["after"]["bits_per_byte"]
            rows.append({
                "method": method,
                "bpb_before": before,
                "bpb_after": after,
                "increase_pct": 100 * (after - before) / before,
                "onnx_2to4": result.report.checks["onnx_2to4"]["passed"],
                "parity": result.report.parity["max_abs_diff"],
                "seconds": time.perf_counter() - started,
            })  # fmt: skip
    print(
        f"{'method':<10} {'bpb before':>10} {'bpb after':>10} {'increase':>9} {'2:4 in ONNX':>11} {'seconds':>8}"
    )
    for r in rows:
        print(
            f"{r['method']:<10} {r['bpb_before']:>10.4f} {r['bpb_after']:>10.4f} {r['increase_pct']:>+8.2f}% "
            f"{str(r['onnx_2to4']):>11} {r['seconds']:>8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
