"""Calibration wall time for 1 vs 2 processes (torch.distributed, gloo) on the tinylm reference model.

Three configurations run the same calibration work on the same windows, one after another:

* ``1 proc x 1 thread`` — the single-process baseline with the per-process thread budget of the 2-rank run;
* ``1 proc x 2 threads`` — the same total cores as the 2-rank run, spent on intra-op threads instead;
* ``2 procs x 1 thread`` — ``torchrun --nproc_per_node 2``, each rank on its shard, sums all-reduced.

Timed steps (each repeated ``--reps`` times; every rank waits at a barrier before and after, so a time is
the slowest rank's wall time; medians reported):

* ``hessians``: SparseGPT/Wanda input statistics (``Σ xxᵀ``) of every block linear, one streamed run;
* ``cosine``: prune-attn cosine importance of every attention sublayer;
* ``fff-collect``: FFF router/leaf fitting inputs of every FFN (sampled, then all-gathered);
* ``mask-2to4 pass``: the whole true-sequential SparseGPT pass (statistics distributed, the per-layer
  OBS solve repeated on every rank).

Every configuration also prints a checksum of the Hessians, which must agree across configurations.

Run:
    python benchmarks/bench_distributed.py [--model ~/.cache/slmopt/tinylm] [--num-samples 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CONFIGS = (("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 procs x 1 thread", 2, 1))


def _worker(args: argparse.Namespace) -> None:
    """One rank: load, capture, then time each calibration step on this rank's shard."""
    import torch

    from slmopt import distributed
    from slmopt.analysis.analyze import analyze
    from slmopt.api import CompileOptions
    from slmopt.data.quality import load_model_data
    from slmopt.loaders import load_program
    from slmopt.passes.fff.graph import collect_branch_inputs
    from slmopt.passes.importance import cosine_importance, units_of
    from slmopt.passes.sparsity.stats import collect_input_stats
    from slmopt.pipeline.manager import PassContext, PassManager
    from slmopt.pipeline.parse import parse_pipeline

    torch.set_num_threads(args.threads)
    distributed.join()
    program, loaded = load_program(str(args.model))
    options = CompileOptions(calib=str(args.model / "calib.txt"), num_samples=args.num_samples)
    calib = load_model_data(loaded.info, options).calib
    structure = analyze(program)
    linears = [lin.node for lin in structure.linears if lin.block is not None]
    attention = units_of(structure, "attention")
    ffn_inputs = [b.ffn.branch_input for b in structure.blocks if b.ffn is not None]
    checksum: list[float] = []

    def hessians() -> None:
        stats = collect_input_stats(program, linears, calib)
        checksum[:] = [float(sum(s.gram.sum() for s in {id(s): s for s in stats.values()}.values()))]

    def mask_pass() -> None:
        ctx = PassContext(calib=calib, progress=False)
        PassManager(parse_pipeline("mask-2to4{method=sparsegpt}")).run(program.clone(), ctx)

    steps: dict[str, Callable[[], object]] = {
        "hessians": hessians,
        "cosine": lambda: cosine_importance(program, attention, calib),
        "fff-collect": lambda: [collect_branch_inputs(program, n, calib, 16384) for n in ffn_inputs],
        "mask-2to4 pass": mask_pass,
    }
    times: dict[str, float] = {}
    for name, step in steps.items():
        samples = []
        for _ in range(args.reps):
            distributed.barrier()
            started = time.perf_counter()
            step()
            distributed.barrier()  # the step is done when the slowest rank is done
            samples.append(time.perf_counter() - started)
        times[name] = statistics.median(samples)
    if distributed.is_main():
        args.out.write_text(json.dumps({"times": times, "checksum": checksum[0], "tokens": calib.numel()}))


def _launch(args: argparse.Namespace, procs: int, threads: int, out: Path) -> dict:
    cmd = [__file__, "--worker", "--threads", str(threads), "--out", str(out), "--model", str(args.model)]
    cmd += ["--num-samples", str(args.num_samples), "--reps", str(args.reps)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
    with socket.socket() as sock:  # a free port: another run (or a test) may hold a fixed one
        sock.bind(("127.0.0.1", 0))
        launcher += ["--master_port", str(sock.getsockname()[1])]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launcher, *cmd], check=True, env=env, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/slmopt/tinylm")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows of 256 bytes")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per step (median)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model}: run examples/tinylm/train.py first", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="slmopt-dist-") as tmp:
        for label, procs, threads in CONFIGS:
            results[label] = _launch(args, procs, threads, Path(tmp) / f"{procs}x{threads}.json")
    base = results[CONFIGS[0][0]]["times"]
    steps = list(base)
    load = {"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count()}
    print(f"calibration: {args.num_samples} windows x 256 tokens, {args.reps} reps, median seconds")
    print(f"load average {load['before']:.1f} -> {load['after']:.1f} on {load['cores']} cores")
    print(f"{'config':<22}" + "".join(f"{s:>18}" for s in steps) + f"{'hessian checksum':>22}")
    for label, res in results.items():
        cells = "".join(f"{res['times'][s]:>9.3f} ({base[s] / res['times'][s]:.2f}x)" for s in steps)
        print(f"{label:<22}{cells}{res['checksum']:>22.10g}")
    if args.json:
        args.json.write_text(json.dumps({"load": load, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
