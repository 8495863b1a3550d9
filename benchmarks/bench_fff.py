"""Op-level benchmark: ``slmopt::fff`` (compiled CPU kernel) vs a dense GELU FFN, side by side.

Shapes follow the FFF papers at BERT-base size (h = 768): a dense FFN of width w = 3072 (two
``F.linear`` calls, the runtime torch uses for ``nn.Linear``) against

* UltraFastBERT 1×11: a depth-11 tree of GELU neurons (L = 12 levels, N = 4095 nodes, 12 used per token);
* FFF depth 4 × 192: 15 routing nodes and 16 GELU leaves of width 192 (16 · 192 = 3072 neurons).

Weights read per token (times 4 bytes in fp32; G = 2 matrices per plain FFN, 3 gated):
dense ``G·h·w``, FFF ``h·(L·m + G·l)`` with m = 1 row per routing level (2 for UltraFastBERT nodes,
which have an output row too) and l the leaf width (0 without leaves). Their ratio is the speed limit
when both are memory-bound (batch 1): 256× for UltraFastBERT 1×11, 15.8× for depth 4 × 192.

Usage:
    python benchmarks/bench_fff.py --threads 1 2 --batches 1 128 16384 --json out/bench_fff.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from slmopt.ops import ensure_native

H, W = 768, 3072


def _make_weights(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Randomly initialised (scaled normal) weights for the three forms."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * fan_in**-0.5

    ufb_nodes = 2**12 - 1
    tree_nodes, leaves, width = 2**4 - 1, 16, 192
    return {
        "dense": {
            "w1": randn(W, H, fan_in=H),
            "b1": randn(W, fan_in=W),
            "w2": randn(H, W, fan_in=W),
            "b2": randn(H, fan_in=W),
        },
        "ufb": {
            "node_w": randn(ufb_nodes, H, fan_in=H),
            "node_b": randn(ufb_nodes, fan_in=H),
            "node_out": randn(ufb_nodes, H, fan_in=12),
        },
        "tree": {
            "node_w": randn(tree_nodes, H, fan_in=H),
            "node_b": randn(tree_nodes, fan_in=H),
            "leaf_w1": randn(leaves, width, H, fan_in=H),
            "leaf_b1": randn(leaves, width, fan_in=width),
            "leaf_w2": randn(leaves, width, H, fan_in=width),
            "leaf_b2": randn(leaves, H, fan_in=width),
        },
    }


def _methods(wts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    d, u, t = wts["dense"], wts["ufb"], wts["tree"]
    op = torch.ops.slmopt.fff.default
    return {
        "dense_w3072": lambda x: F.linear(F.gelu(F.linear(x, d["w1"], d["b1"])), d["w2"], d["b2"]),
        "ufb_1x11": lambda x: op(
            x, u["node_w"], u["node_b"], u["node_out"], None, None, None, None, None, None, "gelu"
        ),
        "fff_d4x192": lambda x: op(
            x,
            t["node_w"],
            t["node_b"],
            None,
            t["leaf_w1"],
            t["leaf_b1"],
            None,
            None,
            t["leaf_w2"],
            t["leaf_b2"],
            "gelu",
        ),
    }


# Weights read per token (in weights), see the module docstring.
BYTES_PER_ROW = {"dense_w3072": 2 * H * W, "ufb_1x11": H * (12 * 2), "fff_d4x192": H * (4 * 1 + 2 * 192)}


def _time(
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    inputs: list[torch.Tensor],
    reps: int,
    rounds: int = 5,
) -> dict[str, float]:
    """Median seconds per call of each method.

    Methods take turns in ``rounds`` blocks (this machine is shared: load drifts, and interleaving spreads
    it evenly); each block starts with untimed warm-up calls. Inputs cycle so FFF paths (and the cache
    lines they touch) vary from call to call.
    """
    samples: dict[str, list[float]] = {name: [] for name in methods}
    per_round = max(1, reps // rounds)
    for _ in range(rounds):
        for name, fn in methods.items():
            for i in range(max(1, min(per_round // 5, 20))):
                fn(inputs[i % len(inputs)])
            for i in range(per_round):
                x = inputs[i % len(inputs)]
                start = time.perf_counter()
                fn(x)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _reps(batch: int, scale: float) -> int:
    base = 1000 if batch == 1 else 50 if batch <= 1024 else 3
    return max(3, int(base * scale))


def run(threads: list[int], batches: list[int], scale: float = 1.0) -> list[dict[str, object]]:
    """Runs every (threads, batch, method) cell; returns one record per cell."""
    if not ensure_native():
        raise SystemExit("the native fff kernel failed to build; see the warning above")
    wts = _make_weights()
    methods = _methods(wts)
    g = torch.Generator().manual_seed(1)
    records: list[dict[str, object]] = []
    floor_args = (torch.randn(1, 1), torch.randn(1, 1), torch.zeros(1), torch.randn(1, 1))
    for nt in threads:
        torch.set_num_threads(nt)
        # Cost of calling the op at all (Python + dispatcher), to read batch-1 numbers against.
        trivial = {"floor": lambda x: torch.ops.slmopt.fff.default(x, *floor_args[1:], *[None] * 6, "relu")}
        floor = _time(trivial, [floor_args[0]], 2000)["floor"]
        for batch in batches:
            n_inputs = 64 if batch == 1 else 2
            inputs = [torch.randn(batch, H, generator=g) for _ in range(n_inputs)]
            with torch.inference_mode():
                times = _time(methods, inputs, _reps(batch, scale), rounds=5 if batch <= 1024 else 3)
            for name, sec in times.items():
                records.append(
                    {
                        "threads": nt,
                        "batch": batch,
                        "method": name,
                        "median_ms": sec * 1e3,
                        "speedup_vs_dense": times["dense_w3072"] / sec,
                        # Kernel-only estimate: what is left after the cost of calling any op at all.
                        "speedup_excl_op_floor": times["dense_w3072"] / max(sec - floor, 1e-9),
                        "byte_ratio": BYTES_PER_ROW["dense_w3072"] / BYTES_PER_ROW[name],
                        "op_call_floor_us": floor * 1e6,
                    }
                )
    return records


def _table(records: list[dict[str, object]]) -> str:
    head = (
        f"{'threads':>7} {'batch':>6} {'method':<12} {'median ms':>11} {'speedup':>8} "
        f"{'excl. floor':>11} {'byte ratio':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['threads']:>7} {r['batch']:>6} {r['method']:<12} {r['median_ms']:>11.4f} "
            f"{r['speedup_vs_dense']:>7.1f}x {r['speedup_excl_op_floor']:>10.1f}x {r['byte_ratio']:>9.1f}x"
        )
    floors = sorted({(r["threads"], round(float(r["op_call_floor_us"]), 2)) for r in records})
    lines.append("op-call floor (trivial fff call, us): " + ", ".join(f"{t} thr: {f}" for t, f in floors))
    lines.append(
        "byte ratio = dense G*h*w / FFF h*(L*m + G*l)  (G = 2 matrices, m = 1 row per routing level,"
    )
    lines.append("             2 for UltraFastBERT nodes; l = leaf width)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128, 16384])
    parser.add_argument("--rep-scale", type=float, default=1.0, help="multiply the repetition counts")
    parser.add_argument("--json", type=Path, help="write the records as JSON here")
    args = parser.parse_args(argv)
    records = run(args.threads, args.batches, args.rep_scale)
    text = json.dumps(records, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    print(_table(records))


if __name__ == "__main__":
    main()
