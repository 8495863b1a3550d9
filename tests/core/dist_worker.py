"""Runs ``slmopt compile`` (through the CLI) for several pipelines in one process; launched by the tests.

Under ``torchrun`` every rank runs this, joins the process group on the first compile and reuses it for
the rest, so one launch covers every pipeline (launches, not compiles, dominate the test time). Without
torchrun it is the single-process reference run of exactly the same commands.

Usage:
    python -m torch.distributed.run --nproc_per_node 2 tests/core/dist_worker.py MODEL CALIB OUTROOT \\
        sparsegpt='mask-2to4{method=sparsegpt}' prune=prune-attn ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from slmopt.cli import main

# Small and fast on the zoo's tiny Llama; 16 windows / batch 8 = one calibration batch per rank with 2 ranks.
COMMON = ["--seq-len", "32", "--num-samples", "16", "--no-bench", "--no-progress", "--threads", "1", "-q"]


def run(model: str, calib: str, outroot: str, jobs: list[str]) -> int:
    for job in jobs:
        name, _, pipeline = job.partition("=")
        out = Path(outroot) / name
        code = main(["compile", model, "--passes", pipeline, "--calib", calib, "-o", str(out), *COMMON])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
