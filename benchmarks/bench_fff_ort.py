"""ONNX Runtime CPU benchmark: dense GELU FFN vs an FFF lowered through ``moe`` and ``ops``, side by side.

Shapes follow DESIGN §4 at BERT-base size: a dense FFN h = 768 → w = 3072 → h (two ONNX MatMuls + bias,
erf GELU) against an FFF of depth 4 (15 routing nodes) with 16 GELU leaves of width 192 (16 · 192 = 3072
neurons), exported through ``torch.onnx.export(dynamo=True)`` with slmopt's ``slmopt::fff`` translations.

Weights read per token: dense ``2·h·w``, FFF ``h·(L + 2·l)`` (one routing row per level plus the leaf),
so the theoretical byte ratio — the speed limit when both are memory-bound at batch 1 — is 15.8×. (The
``dense`` routing form reads all N = 15 routing rows: 15.4×.)

All sessions of one thread count are timed in interleaved rounds in one process (same threads, warm-up
first), cycling through ``--inputs`` different inputs so that the FFF does not re-read one cache-hot leaf;
the table reports medians and ratios. Outputs are checked against ``fff_reference`` first.

Usage:
    python benchmarks/bench_fff_ort.py --threads 1 2 --batches 1 128 --json out/bench_fff_ort.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from slmopt.backends.onnxrt import fff as onnx_fff
from slmopt.lowering import onnx_translations
from slmopt.ops import fff_reference

H, W = 768, 3072
LEVELS, LEAF_WIDTH = 4, 192
MODES = ("moe", "ops")
TARGET_MOE_SPEEDUP_B1 = 5.0


def make_weights(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Scaled-normal weights for the dense FFN and the FFF (same neuron count)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * fan_in**-0.5

    n, e = 2**LEVELS - 1, 2**LEVELS
    return {
        "dense": {
            "w1": randn(H, W, fan_in=H),  # stored [in, out] as an exported MatMul initializer is
            "b1": randn(W, fan_in=W),
            "w2": randn(W, H, fan_in=W),
            "b2": randn(H, fan_in=W),
        },
        "fff": {
            "node_w": randn(n, H, fan_in=H),
            "node_b": randn(n, fan_in=H),
            "leaf_w1": randn(e, LEAF_WIDTH, H, fan_in=H),
            "leaf_b1": randn(e, LEAF_WIDTH, fan_in=LEAF_WIDTH),
            "leaf_w2": randn(e, LEAF_WIDTH, H, fan_in=LEAF_WIDTH),
            "leaf_b2": randn(e, H, fan_in=LEAF_WIDTH),
        },
    }


def dense_model(w: dict[str, torch.Tensor]) -> bytes:
    """x @ w1 + b1 → erf GELU → @ w2 + b2, as ORT sees an exported nn.Linear pair."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Add", ["a", "b1"], ["z"]),
        helper.make_node("Div", ["z", "sqrt2"], ["zs"]),
        helper.make_node("Erf", ["zs"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf1"]),
        helper.make_node("Mul", ["z", "erf1"], ["ze"]),
        helper.make_node("Mul", ["ze", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]
    consts = {"sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}
    inits = [numpy_helper.from_array(t.numpy(), k) for k, t in w.items()]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    graph = helper.make_graph(
        nodes,
        "dense_ffn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["t", H])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["t", H])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _FFF(torch.nn.Module):
    def __init__(self, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.w = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in w.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        args = (w["leaf_w1"], w["leaf_b1"], None, None, w["leaf_w2"], w["leaf_b2"])
        return torch.ops.slmopt.fff(x, w["node_w"], w["node_b"], None, *args, "gelu")


def fff_model(w: dict[str, torch.Tensor], mode: str) -> bytes:
    """The FFF exported with the ``mode`` lowering (tokens dynamic)."""
    onnx_fff.register()
    program = torch.onnx.export(
        _FFF(w).eval(),
        (torch.randn(4, H),),
        dynamo=True,
        custom_translation_table=onnx_translations({"fff_lowering": mode}),
        dynamic_shapes=({0: torch.export.Dim("tokens")},),
        verbose=False,
    )
    return program.model_proto.SerializeToString()


class Runner:
    """One ORT session cycling through pre-bound inputs (IOBinding keeps Python overhead out).

    Several different inputs make successive calls reach different leaves, as successive tokens do;
    with one fixed input the FFF would re-read one cache-hot leaf while the dense FFN streams all weights.
    """

    def __init__(self, model: bytes, threads: int, xs: list[np.ndarray]) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.out = np.empty_like(xs[0])
        out = ort.OrtValue.ortvalue_from_numpy(self.out)
        self.bindings = []
        for x in xs:
            binding = self.sess.io_binding()
            binding.bind_cpu_input(self.sess.get_inputs()[0].name, x)
            binding.bind_ortvalue_output(self.sess.get_outputs()[0].name, out)
            self.bindings.append(binding)
        self.calls = 0

    def __call__(self) -> np.ndarray:
        self.sess.run_with_iobinding(self.bindings[self.calls % len(self.bindings)])
        self.calls += 1
        return self.out


def time_side_by_side(runners: dict[str, Runner], rounds: int, budget_s: float) -> dict[str, float]:
    """Median µs per call for each runner, measured in interleaved rounds after a warm-up."""
    reps = {}
    for name, run in runners.items():
        for _ in range(5):
            run()
        t0 = time.perf_counter()
        for _ in range(10):
            run()
        per_call = (time.perf_counter() - t0) / 10
        reps[name] = max(1, int(budget_s / rounds / per_call / len(runners)))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter_ns()
            for _ in range(reps[name]):
                run()
            samples[name].append((time.perf_counter_ns() - t0) / reps[name] / 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def check_outputs(models: dict[str, bytes], w: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |diff| vs fff_reference on tokens with a clear routing margin (MoE's GELU is tanh-approximate)."""
    x = torch.randn(128, H, generator=torch.Generator().manual_seed(1))
    want = fff_reference(x, **{k: v for k, v in w.items()}, activation="gelu")
    mask = onnx_fff.routing_margin_mask(x, w["node_w"], w["node_b"])
    diffs = {}
    for mode in MODES:
        got = torch.from_numpy(Runner(models[mode], 1, [x.numpy()])().copy())
        diffs[mode] = float((got - want)[mask].abs().max())
    return diffs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per case")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per case")
    parser.add_argument("--inputs", type=int, default=16, help="distinct inputs cycled through per case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    weights = make_weights()
    models = {"dense": dense_model(weights["dense"])}
    models |= {mode: fff_model(weights["fff"], mode) for mode in MODES}
    diffs = check_outputs(models, weights["fff"])
    byte_ratio = 2 * W / (LEVELS + 2 * LEAF_WIDTH)

    rows = []
    for threads in args.threads:
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            xs = [rng.standard_normal((batch, H), dtype=np.float32) for _ in range(args.inputs)]
            runners = {name: Runner(model, threads, xs) for name, model in models.items()}
            med = time_side_by_side(runners, args.rounds, args.budget)
            row = {"threads": threads, "batch": batch} | {f"{k}_us": round(v, 2) for k, v in med.items()}
            row |= {f"{m}_speedup": round(med["dense"] / med[m], 2) for m in MODES}
            rows.append(row)

    header = (
        f"{'threads':>7} {'batch':>5} {'dense µs':>10} {'moe µs':>9} {'ops µs':>9} {'moe ×':>7} {'ops ×':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['threads']:>7} {r['batch']:>5} {r['dense_us']:>10.1f} {r['moe_us']:>9.1f} "
            f"{r['ops_us']:>9.1f} {r['moe_speedup']:>7.2f} {r['ops_speedup']:>7.2f}"
        )
    b1 = [r["moe_speedup"] for r in rows if r["batch"] == 1]
    met = bool(b1) and min(b1) >= TARGET_MOE_SPEEDUP_B1
    print(f"theoretical byte ratio (batch 1): {byte_ratio:.1f}x; max |diff| vs reference: {diffs}")
    print(f"target moe batch-1 speedup >= {TARGET_MOE_SPEEDUP_B1}x: {'met' if met else 'NOT met'}")
    result = {
        "config": {"h": H, "w": W, "levels": LEVELS, "leaf_width": LEAF_WIDTH, "activation": "gelu"},
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
        "byte_ratio": round(byte_ratio, 2),
        "max_abs_diff": diffs,
        "target_moe_b1_speedup_met": met,
        "results": rows,
    }
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
