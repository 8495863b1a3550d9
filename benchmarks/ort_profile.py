"""Where the time goes in an ONNX Runtime engine: per-op totals by category, original vs compiled.

Usage::

    python benchmarks/ort_profile.py MODEL COMPILED_DIR [--threads 2] [--seq 128] [--context 128]

MODEL is the original (a model folder, or an slmopt output folder of it); it is lowered once into
``--original-dir`` (kept, so a second run reuses it). Both engines run with ORT's profiler on:

* ``prefill``: ``model.onnx`` on one prompt of ``--seq`` token ids (what ``slmopt bench`` times);
* ``decode``: ``decoder.onnx``, one new token against ``--context`` cached positions.

Every node event of the profile is put in a category by :data:`CATEGORIES` (first matching rule: op type,
then the exporter's name scope, then the weights the node reads), summed over ``--reps`` runs and divided
by the run count: the table shows milliseconds per run and the share of the node total. The per-run wall
time (median, outside the profiler) is printed beside it, so per-op overheads the profiler hides show up
as the gap between "nodes" and "wall".

Example::

    python benchmarks/ort_profile.py /tmp/m /tmp/out --threads 2 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["CATEGORIES", "categorize", "main", "profile_session"]

# (category, predicate on (op_type, name scope, weight names)): the first match wins.
Rule = tuple[str, Callable[[str, str, tuple[str, ...]], bool]]
CATEGORIES: list[Rule] = [
    ("fff leaves (MoE)", lambda op, scope, w: op == "MoE"),
    ("fff routing", lambda op, scope, w: "fff" in scope or any("fff" in n for n in w)),
    ("LM head", lambda op, scope, w: "lm_head" in scope or any("lm_head" in n or "embed" in n for n in w)),
    ("attention projections", lambda op, scope, w: op in ("MatMul", "Gemm", "FusedMatMul")
     and "attn" in scope),  # fmt: skip
    ("attention (scores, softmax, rotary, cache)", lambda op, scope, w: "attn" in scope or "rotary" in scope),
    ("dense FFN", lambda op, scope, w: "mlp" in scope),
    ("norms", lambda op, scope, w: "norm" in scope or op in ("SimplifiedLayerNormalization",
                                                              "SkipSimplifiedLayerNormalization")),
]  # fmt: skip


def _scope(node: onnx.NodeProto) -> str:
    """The exporter's module path of a node (``model.layers.3.self_attn.q_proj``), lower-cased."""
    props = {p.key: p.value for p in node.metadata_props}
    return (props.get("pkg.torch.onnx.name_scopes", "") + props.get("namespace", "")).lower()


def node_facts(path: Path) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """node name -> (op type, scope, initializer inputs) for every node of the model file."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {
        n.name: (n.op_type, _scope(n), tuple(i.lower() for i in n.input if i in inits))
        for n in model.graph.node
    }


def categorize(op: str, scope: str, weights: tuple[str, ...]) -> str:
    """The first :data:`CATEGORIES` rule that matches, else ``other``.

    Example:
        >>> categorize("MoE", "", ())
        'fff leaves (MoE)'
    """
    return next((name for name, match in CATEGORIES if match(op, scope, weights)), "other")


def profile_session(
    path: Path, feeds_of: Callable[[ort.InferenceSession], dict[str, np.ndarray]], threads: int, reps: int
) -> dict[str, Any]:
    """Runs ``path`` ``reps`` times with ORT's profiler; per-category ms per run, wall median."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory(prefix="slmopt-prof-") as tmp:
        # The optimized graph: node names in the profile are those after ORT's fusions.
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        facts = node_facts(Path(tmp) / "optimized.onnx") | node_facts(path)
        feeds = feeds_of(plain)
        for _ in range(3):
            plain.run(None, feeds)
        wall = []
        for _ in range(reps):
            start = time.perf_counter()
            plain.run(None, feeds)
            wall.append((time.perf_counter() - start) * 1e3)
        del plain
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(3 + reps):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    # Only node events inside the last `reps` runs count (the first ones allocate and warm caches).
    runs = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in events if ev.get("name") == "model_run")[-reps:]
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
            continue
        if not any(lo <= ev["ts"] <= hi for lo, hi in runs):
            continue
        name = ev["name"][: -len("_kernel_time")]
        op = ev.get("args", {}).get("op_name", "?")
        facts_of = facts.get(name, (op, "", ()))
        totals[categorize(op, facts_of[1], facts_of[2])] += ev["dur"] / 1e3 / len(runs)
        ops[op] += ev["dur"] / 1e3 / len(runs)
    return {"wall_ms": statistics.median(wall), "categories": dict(totals), "ops": dict(ops)}


def _ids(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def _vocab(folder: Path) -> int:
    return int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])


def _decode_feeds(folder: Path, context: int, threads: int) -> Callable[[ort.InferenceSession], dict]:
    from backends.onnxrt.generation import OnnxDecoder

    def feeds_of(session: ort.InferenceSession) -> dict[str, np.ndarray]:
        decoder = OnnxDecoder(folder, threads=threads, allow_spinning=False)
        vocab = int(decoder.layout.vocab_size or 2)
        _, past = decoder(_ids(1, context, vocab, seed=1), decoder.empty_past(1))
        names = [i.name for i in session.get_inputs()]
        return {"input_ids": _ids(1, 1, vocab, seed=2), **dict(zip(names[1:], past, strict=True))}

    return feeds_of


def _prefill_feeds(vocab: int, seq: int) -> Callable[[ort.InferenceSession], dict]:
    def feeds_of(session: ort.InferenceSession) -> dict[str, np.ndarray]:
        return {session.get_inputs()[0].name: _ids(1, seq, vocab, seed=0)}

    return feeds_of


def _lower_original(model: str, out: Path) -> Path:
    if (out / "model.onnx").is_file() and (out / "decoder.onnx").is_file():
        return out
    from slmopt.loaders import load_program
    from slmopt.lowering import get_backend

    program, _ = load_program(model)
    get_backend("onnxruntime").lower(program, out, {})
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per category, ms per run and share, for every (phase, engine)."""
    columns = [(phase, engine) for phase in result["phases"] for engine in ("original", "compiled")]
    cats = sorted({c for ph, en in columns for c in result["phases"][ph][en]["categories"]},
                  key=lambda c: -result["phases"][columns[0][0]]["original"]["categories"].get(c, 0.0))  # fmt: skip
    head = "| category | " + " | ".join(f"{ph} {en} ms (share)" for ph, en in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for cat in cats:
        cells = []
        for ph, en in columns:
            run = result["phases"][ph][en]
            ms = run["categories"].get(cat, 0.0)
            cells.append(f"{ms:.2f} ({ms / max(sum(run['categories'].values()), 1e-9):.0%})")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    for label, key in (("nodes total", None), ("wall (median, profiler off)", "wall_ms")):
        cells = []
        for ph, en in columns:
            run = result["phases"][ph][en]
            cells.append(f"**{run[key] if key else sum(run['categories'].values()):.2f}**")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratios = [
        f"{ph}: wall {result['phases'][ph]['original']['wall_ms'] / result['phases'][ph]['compiled']['wall_ms']:.2f}x"
        for ph in result["phases"]
    ]
    return "\n".join(lines) + "\n\noriginal/compiled " + ", ".join(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="the original model (folder, or an slmopt output folder of it)")
    parser.add_argument("compiled", type=Path, help="slmopt output folder (model.onnx, decoder.onnx)")
    parser.add_argument("--original-dir", type=Path, help="where the lowered original is kept (reused)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="prefill prompt length (128)")
    parser.add_argument("--context", type=int, default=128, help="decode: cached positions (128)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    original = Path(args.model)
    if not (original / "decoder.onnx").is_file():
        original = _lower_original(
            args.model, args.original_dir or Path(tempfile.mkdtemp(prefix="slmopt-orig-"))
        )
    result: dict[str, Any] = {"threads": args.threads, "seq": args.seq, "context": args.context, "phases": {}}
    vocab = _vocab(args.compiled)
    for phase in ("prefill", "decode"):
        result["phases"][phase] = {}
        for engine, folder in (("original", original), ("compiled", args.compiled)):
            if phase == "prefill":
                path, feeds = folder / "model.onnx", _prefill_feeds(vocab, args.seq)
            else:
                path, feeds = folder / "decoder.onnx", _decode_feeds(folder, args.context, args.threads)
            result["phases"][phase][engine] = profile_session(path, feeds, args.threads, args.reps)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
