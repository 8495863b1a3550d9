"""FFN -> FFF conversion on tinylm: held-out bits per byte by tree depth, with and without distillation.

Usage::

    python benchmarks/fff_quality.py [--model ~/.cache/slmopt/tinylm] [--calib-samples 64]
        [--eval-windows 64] [--threads 2] [--depths 2 3] [--json out.json]

Every SwiGLU FFN of the model is converted (``fff{depth=d}``); rows per depth:

* ``raw`` — balanced co-activation partition + fitted routers only (``refit=none,distill_steps=0``);
* ``closed-form`` — plus the closed-form leaf refit / neuron re-selection rounds (``distill_steps=0``);
* ``distilled`` — plus layer-local soft -> hard distillation (the pass's defaults).

Quality is bits per byte on contiguous 256-byte windows of ``heldout.txt``. DESIGN §4's baseline on a
similar model: depth 2 (1/4 active) +38.7 % loss before distillation, +5.8 % after; depth 3 +10.5 %.
Prints a table, then the JSON (also written to ``--json``).
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

import slmopt.passes.fff.ffn_to_fff  # noqa: F401 - registers the fff pass
from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.parse import parse_pipeline

__all__ = ["main", "run", "table"]

log = logging.getLogger(__name__)
DEFAULT_MODEL = Path("~/.cache/slmopt/tinylm").expanduser()
SEQ = 256

# variant name -> extra pass options (appended to depth=d).
VARIANTS: dict[str, str] = {
    "raw": "refit=none,distill_steps=0",
    "closed-form": "distill_steps=0",
    "distilled": "",
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Converts tinylm at every depth and variant; returns the JSON-ready result."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    program, calib, heldout = load_reference(args.model, SEQ, args.calib_samples, args.eval_windows)
    base = bits_per_byte(program, heldout)
    rows: list[dict[str, Any]] = [
        {"variant": "original", "depth": 0, "active": 1.0, "bits_per_byte": base, "seconds": 0.0}
    ]
    for depth in args.depths:
        for variant, extra in VARIANTS.items():
            spec = f"fff{{depth={depth}{',' + extra if extra else ''}}}"
            t0 = time.perf_counter()
            new, reports = PassManager(parse_pipeline(spec)).run(
                program, PassContext(calib=calib, progress=False)
            )
            seconds = time.perf_counter() - t0
            layers = reports[0].metrics["layers"]
            rows.append(
                {
                    "variant": variant,
                    "depth": depth,
                    "active": layers[0]["active_fraction"],
                    "bits_per_byte": bits_per_byte(new, heldout),
                    "seconds": round(seconds, 1),
                    "pipeline": reports[0].options,
                    "weights_read_fraction": reports[0].metrics["weights_read_fraction"],
                    "local_loss_before": [round(r["local_loss_before"], 5) for r in layers],
                    "local_loss_after": [round(r["local_loss_after"], 5) for r in layers],
                    "router_accuracy": [round(r["router_accuracy"], 4) for r in layers],
                    "steps": [r["steps"] for r in layers],
                }
            )
            log.info(
                "depth %d %-12s %.4f bits/byte (%.0fs)", depth, variant, rows[-1]["bits_per_byte"], seconds
            )
    for row in rows:
        row["delta_pct"] = 100 * (row["bits_per_byte"] / base - 1)
    recovery = {}
    for depth in args.depths:
        by = {r["variant"]: r["bits_per_byte"] for r in rows if r["depth"] == depth}
        lost = by["raw"] - base
        recovery[str(depth)] = (by["raw"] - by["distilled"]) / lost if lost > 0 else None
    return {
        "model": str(args.model),
        "calibration": {"windows": int(calib.shape[0]), "seq_len": SEQ},
        "heldout": {"windows": int(heldout.shape[0]), "seq_len": SEQ},
        "rows": rows,
        "recovered_share_of_conversion_loss": recovery,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(result: dict[str, Any]) -> str:
    """The rows as an aligned text table."""
    head = ("variant", "depth", "active", "bits/byte", "delta %", "local rel. MSE (per layer)", "pass s")
    lines = [head] + [
        (
            r["variant"],
            str(r["depth"] or "-"),
            f"{r['active']:.3f}",
            f"{r['bits_per_byte']:.4f}",
            f"{r['delta_pct']:+.2f}",
            " ".join(f"{v:.3f}" for v in r.get("local_loss_after", [])) or "-",
            f"{r['seconds']:.0f}",
        )
        for r in result["rows"]
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    share = ", ".join(
        f"depth {d}: {v:.0%}" if v is not None else f"depth {d}: -"
        for d, v in result["recovered_share_of_conversion_loss"].items()
    )
    out.append(f"share of the raw conversion loss recovered (raw -> distilled): {share}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.model / "config.json").is_file():
        print(
            f"skipped: no tinylm at {args.model} (train it: python examples/tinylm/train.py --out {args.model})"
        )
        return 0
    result = run(args)
    print(table(result))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
