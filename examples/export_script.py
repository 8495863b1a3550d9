"""Use slmopt from an export script: compile a model, check the report, use the engine.

Run:
    python examples/export_script.py ~/.cache/slmopt/tinylm out/tinylm-2to4

Example:
    >>> # result = slmopt.compile(model_dir, passes="mask-2to4{method=sparsegpt}", calib=..., output_dir=...)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import slmopt
from slmopt.lowering import load_engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="Hugging Face model folder (e.g. the tinylm cache)")
    parser.add_argument("output", type=Path, help="output folder")
    parser.add_argument("--passes", default="mask-2to4{method=sparsegpt}")
    args = parser.parse_args()

    result = slmopt.compile(
        args.model,
        passes=args.passes,
        calib=str(args.model / "calib.txt"),
        eval=str(args.model / "heldout.txt"),
        backend="onnxruntime",
        output_dir=args.output,
        force=True,
        num_samples=32,
    )
    report = result.report
    if not report.parity["passed"]:
        print(f"parity failed: {report.parity}", file=sys.stderr)
        return 1
    print(f"pipeline: {report.pipeline}")
    print(f"parity max |diff|: {report.parity['max_abs_diff']:.2e}")
    if report.quality:
        before, after = report.quality["before"], report.quality["after"]
        print(f"bits/byte: {before['bits_per_byte']:.4f} -> {after['bits_per_byte']:.4f}")

    # The engine runs without slmopt's passes: load it and score a prompt.
    engine = load_engine(args.output, threads=1)
    ids = torch.tensor([list(b"def main():\n    return ")])
    next_id = int(engine(ids)[0, -1].argmax())
    print(f"next byte after the prompt: {bytes([next_id])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
