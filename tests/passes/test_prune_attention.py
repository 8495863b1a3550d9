"""Tests for the ``prune-attn`` pass, ``slmopt.passes.importance`` and ``slmopt.plots``.

References are independent of the pass: removing a sublayer is compared with the Hugging Face (or
hand-written) model whose branch output projection is replaced *by a forward hook* (zeros, the mean output,
or the test's own ``torch.linalg.lstsq`` fit), and ONNX files are checked op by op and weight by weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import slmopt.passes.prune_attention as pa
from slmopt.analysis.analyze import analyze
from slmopt.passes.importance import IMPORTANCE_METRICS, units_of
from slmopt.pipeline.parse import parse_pipeline
from slmopt.program import ModelInfo, Program, capture
from tests.helpers import captured, run_pipeline
from tests.models import (
    HiddenOnly,
    LogitsOnly,
    TinyConfig,
    TinyTransformerLM,
    build_model,
    example_ids,
)

# Output projection of each sublayer, per zoo model: a hook on it replaces the branch by hand.
BRANCH_OUT = {
    "gpt2": {"attention": "transformer.h.{i}.attn.c_proj", "mlp": "transformer.h.{i}.mlp.c_proj"},
    "llama": {"attention": "model.layers.{i}.self_attn.o_proj", "mlp": "model.layers.{i}.mlp.down_proj"},
    "qwen2": {"attention": "model.layers.{i}.self_attn.o_proj", "mlp": "model.layers.{i}.mlp.down_proj"},
    "bert": {
        "attention": "encoder.layer.{i}.attention.output.dense",
        "mlp": "encoder.layer.{i}.output.dense",
    },
    "tiny": {"attention": "blocks.{i}.attn.o_proj", "mlp": "blocks.{i}.fc2"},
}
BRANCH_IN = {"llama": "model.layers.{i}.self_attn.q_proj", "tiny": "blocks.{i}.attn.q_proj"}
CALIB = example_ids(batch=16, seq=16, seed=1)


pytestmark = pytest.mark.usefixtures("one_thread")


_captured = captured  # PassManager works on a clone, so one capture serves every test


def _prune(program: Program, options: str, calib: torch.Tensor | None = CALIB, **ctx_fields):
    _, new, reports = run_pipeline(program, f"prune-attn{{{options}}}", calib, **ctx_fields)
    return new, reports[0]


def _reference(name: str, hooks: dict[str, Callable], ids: torch.Tensor) -> torch.Tensor:
    """The zoo model run eagerly with ``{module path: replacement(inputs, output)}`` forward hooks."""
    model = build_model(name)
    wrapped = model if name == "tiny" else (HiddenOnly(model) if name == "bert" else LogitsOnly(model))
    for path, fn in hooks.items():
        model.get_submodule(path).register_forward_hook(lambda m, i, o, fn=fn: fn(i[0], o))
    with torch.no_grad():
        return wrapped(ids)


def _collect(name: str, path: str, ids: torch.Tensor, use_input: bool = False) -> torch.Tensor:
    """All token rows a module of the zoo model sees (``use_input``) or produces on ``ids``."""
    rows: list[torch.Tensor] = []

    def keep(i: torch.Tensor, o: torch.Tensor) -> None:
        t = i if use_input else o
        rows.append(t.reshape(-1, t.shape[-1]))

    _reference(name, {path: keep}, ids)
    return torch.cat(rows).double()


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "bert", "tiny"])
@pytest.mark.parametrize("target", ["attention", "mlp", "block"])
def test_removal_equals_hand_zeroed_branch(name: str, target: str) -> None:
    new, report = _prune(_captured(name), f"target={target},remove=1")
    assert report.metrics["removed"] == [1]  # layer 0 is protected by default
    kinds = ["attention", "mlp"] if target == "block" else [target]
    zero = {BRANCH_OUT[name][k].format(i=1): lambda i, o: torch.zeros_like(o) for k in kinds}
    ids = example_ids(batch=3, seq=11, seed=7)  # other shapes than the capture: dynamic dims still work
    expected = _reference(name, zero, ids)
    torch.testing.assert_close(new(ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(new(ids), _reference(name, {}, ids), atol=1e-3)  # it did change something


@pytest.mark.parametrize("options", ["keep=1", "remove=0"])
def test_nothing_to_remove_is_bit_identical(options: str) -> None:
    program = _captured("llama")
    new, report = _prune(program, options, calib=None)
    ids = example_ids(batch=2, seq=9, seed=3)
    assert torch.equal(new(ids), program(ids))
    assert not report.changed and report.params_after == report.params_before
    assert any("nothing changed" in w for w in report.warnings)


def test_replay_needs_no_calibration_and_later_analysis_still_works() -> None:
    new, report = _prune(_captured("qwen2"), "layers=1,protect=", calib=None)
    assert report.metrics["removed"] == [1] and report.changes[0].detail["score"] is None
    blocks = analyze(new).blocks
    assert [b.attention is not None for b in blocks] == [True, False]
    assert all(b.ffn is not None for b in blocks)  # the FFN after the removed attention is still found


# ----------------------------------------------------------------------------------------------- recovery
def test_bias_recovery_is_the_mean_branch_output() -> None:
    new, report = _prune(_captured("llama"), "remove=1,recover=bias")
    mean = _collect("llama", BRANCH_OUT["llama"]["attention"].format(i=1), CALIB).mean(0)
    added = [n.target for n in new.graph.nodes if n.op == "get_attr" and "recovery" in n.target]
    assert len(added) == 1
    torch.testing.assert_close(new.param(added[0]).double(), mean, atol=1e-6, rtol=0)
    path = BRANCH_OUT["llama"]["attention"].format(i=1)
    ids = example_ids(batch=2, seq=12, seed=4)
    expected = _reference("llama", {path: lambda i, o: mean.float().expand_as(o)}, ids)
    torch.testing.assert_close(new(ids), expected, atol=1e-5, rtol=0)
    assert report.changes[0].detail["recovery"] == "bias"


@pytest.mark.parametrize("name", ["llama", "tiny"])  # RMSNorm input; LayerNorm input (rank-deficient)
def test_full_rank_lowrank_recovery_is_least_squares(name: str) -> None:
    hidden = analyze(_captured(name)).hidden_size
    new, report = _prune(_captured(name), f"remove=1,recover=lowrank,rank={hidden}")
    q_path, o_path = BRANCH_IN[name].format(i=1), BRANCH_OUT[name]["attention"].format(i=1)
    x = _collect(name, q_path, CALIB, use_input=True)  # the normed stream the branch reads
    y = _collect(name, o_path, CALIB)  # the branch output
    design = torch.cat([x, torch.ones(len(x), 1).double()], 1)
    # rcond 1e-5: directions below float32 precision (LayerNorm's zero-sum rows) are rounding noise.
    coef = torch.linalg.lstsq(design, y, rcond=1e-5, driver="gelsd").solution

    seen: list[torch.Tensor] = []

    def fitted(i: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        x = seen[-1].double()
        return (torch.cat([x, torch.ones(*x.shape[:-1], 1).double()], -1) @ coef).float()

    ids = CALIB[:4]
    # The hooked reference replaces the branch output by the test's own least-squares prediction.
    expected = _reference(name, {q_path: lambda i, o: seen.append(i), o_path: fitted}, ids)
    torch.testing.assert_close(new(ids), expected, atol=1e-4, rtol=0)
    assert report.changes[0].detail["rank"] == hidden
    added = sorted(n.target for n in new.graph.nodes if n.op == "get_attr" and "recovery" in n.target)
    assert [tuple(new.param(t).shape) for t in added] == [(hidden,), (hidden, hidden), (hidden, hidden)]


@pytest.mark.parametrize("name", ["gpt2", "bert"])  # BERT: post-norm, the branch reads the stream itself
def test_lowrank_rank_bounds_the_map(name: str) -> None:
    new, _ = _prune(_captured(name), "remove=1,recover=lowrank,rank=3")
    added = {
        n.target.rsplit("_", 1)[-1]: new.param(n.target)
        for n in new.graph.nodes
        if "recovery" in str(n.target)
    }
    assert added["down"].shape == (3, 48) and added["up"].shape == (48, 3)
    assert torch.linalg.matrix_rank(added["up"].double() @ added["down"].double()) == 3
    structure = analyze(new)  # the recovery add keeps shapes in node meta: later passes still see blocks
    assert structure.blocks[1].attention is None and structure.blocks[1].ffn is not None


# ----------------------------------------------------------------------------------------------- importance
def _periodic(n: int, vocab: int, gen: torch.Generator, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, 4), generator=gen).repeat(1, seq // 4)  # needs attention to predict


@functools.cache
def _trained_with_dead_layer() -> tuple[Program, torch.Tensor]:
    """A 4-layer LM trained briefly on periodic sequences with attention layer 2's output zeroed."""
    torch.manual_seed(0)
    vocab = 16
    model = TinyTransformerLM(TinyConfig(vocab, 32, 4, 4, 64, 32))
    dead = model.blocks[2].attn.o_proj
    with torch.no_grad():
        dead.weight.zero_()
        dead.bias.zero_()
    dead.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        x = _periodic(32, vocab, gen)
        loss = F.cross_entropy(model(x)[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    calib = _periodic(16, vocab, torch.Generator().manual_seed(2))
    info = ModelInfo(kind="causal-lm", source="test", vocab_size=vocab, max_seq_len=32)
    return capture(model.eval(), (calib[:2],), info), calib


@pytest.mark.parametrize("metric", ["cosine", "loss", "kl"])
def test_a_branch_that_contributes_nothing_ranks_least_important(metric: str) -> None:
    program, calib = _trained_with_dead_layer()
    scores = IMPORTANCE_METRICS[metric].score(program, units_of(analyze(program), "attention"), calib)
    assert int(np.argmin(scores)) == 2 and scores[2] == pytest.approx(0.0, abs=1e-9)
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    new, report = _prune(program, f"metric={metric},remove=1", calib=calib)
    assert report.metrics["removed"] == [2]
    rows = report.metrics["importance"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3] and rows[0]["protected"] and rows[2]["removed"]
    torch.testing.assert_close(new(calib), program(calib), atol=1e-5, rtol=0)  # nothing was lost


def test_iterative_rescoring_removes_in_order_and_records_scores() -> None:
    program, calib = _trained_with_dead_layer()
    _, report = _prune(program, "metric=loss,remove=2,iterative=true", calib=calib)
    first, second = report.changes
    assert first.detail["index"] == 2 and first.detail["order"] == 0 and second.detail["order"] == 1
    assert second.detail["index"] in (1, 3) and second.detail["score"] > 0
    assert report.metrics["removed"] == sorted([2, second.detail["index"]])


# ----------------------------------------------------------------------------------------------- report
def test_report_costs_quality_sweep_and_plots(tmp_path) -> None:
    eval_tokens = example_ids(batch=4, seq=16, seed=9)
    _, report = _prune(
        _captured("llama"), "remove=1,sweep=true", eval_tokens=eval_tokens, artifact_dir=tmp_path
    )
    m = report.metrics
    per_layer = 2 * 2 * 16  # 2 (K and V) * kv_heads * head_dim
    assert m["kv_cache_bytes_per_token"] == {
        "fp32": {"before": 2 * 4 * per_layer, "after": 4 * per_layer},
        "fp16": {"before": 2 * 2 * per_layer, "after": 2 * per_layer},
    }
    proj = 64 * 64 * 2 + 64 * 32 * 2  # q, o: 64x64; k, v (GQA): 64x32
    flops = m["attention_flops_per_token"]
    assert flops["before"] - flops["after"] == 2 * proj + 4 * 4 * 16 * flops["context"]
    assert m["params"] == {"before": report.params_before, "after": report.params_after}
    assert report.params_before - report.params_after == proj + 64  # + the removed RMSNorm weight
    assert set(m["quality"]) == {"data", "before", "after"} and m["quality"]["data"] == "eval"
    assert [r["removed"] for r in m["sweep"]] == [0, 1]
    assert m["sweep"][0]["nats_per_token"] == pytest.approx(m["quality"]["before"]["nats_per_token"])
    assert m["sweep"][1]["nats_per_token"] == pytest.approx(m["quality"]["after"]["nats_per_token"], abs=1e-5)
    assert m["replay"] == "prune-attn{target=attention,layers=1,recover=none}"
    pytest.importorskip("matplotlib")
    assert len(m["plots"]) == 2
    for name in m["plots"]:  # relative to the artifact folder, which is renamed into place later
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_are_skipped_without_matplotlib(monkeypatch, tmp_path, caplog) -> None:
    import builtins

    from slmopt import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plots.bar_chart(tmp_path / "x.png", ["a"], [1.0]) is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------- ONNX
def _initializers(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@functools.cache
def _lowered(name: str, options: str, root: str):
    from pathlib import Path

    from slmopt.backends.onnxrt.backend import onnx_op_histogram
    from slmopt.lowering import get_backend

    program = _captured(name) if not options else _prune(_captured(name), options)[0]
    out = Path(root) / f"{name}-{options or 'original'}"
    out.mkdir()
    backend = get_backend("onnxruntime")
    backend.lower(program, out, {"verify": False})
    return (
        program,
        backend.load(out, threads=1),
        onnx_op_histogram(out / "model.onnx"),
        _initializers(out / "model.onnx"),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "lower_original"),
    # Exporting costs ~10 s per model here: the original is lowered for one pre-norm GQA and one post-norm
    # model; for the others the "before" side comes from the original Program (SDPA nodes, parameters).
    [("gpt2", False), ("llama", True), ("qwen2", False), ("bert", True)],
)
def test_onnx_has_no_trace_of_the_removed_attention(
    name: str, lower_original: bool, tmp_path_factory
) -> None:
    root = str(tmp_path_factory.getbasetemp())
    original = _captured(name)
    pruned, engine, ops_after, init_after = _lowered(name, "remove=1,recover=none", root)
    ids = example_ids(batch=3, seq=13, seed=11)
    torch.testing.assert_close(engine(ids), pruned(ids), atol=1e-4, rtol=0)
    sdpa = sum(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in original.graph.nodes)
    params_before = original.num_params()
    if lower_original:
        _, _, ops_before, init_before = _lowered(name, "", root)
        assert ops_before["Softmax"] == sdpa
        matmuls = ops_before.get("MatMul", 0) + ops_before.get("Gemm", 0)
        assert ops_after.get("MatMul", 0) + ops_after.get("Gemm", 0) < matmuls
        params_before = sum(a.size for a in init_before.values())
    assert ops_after["Softmax"] == sdpa - 1 == 1
    assert sum(a.size for a in init_after.values()) < params_before
    # The removed layer's weights appear neither by name nor by value (the optimizer may rename/transpose).
    structure = analyze(original)
    for info in (structure.linear(n) for n in structure.blocks[1].attention.linears):
        weight = original.param(info.weight).numpy()
        assert not any(k.endswith(info.weight) for k in init_after)
        assert not any(_same(a, weight) for a in init_after.values())
    kept = original.param(structure.linear(structure.blocks[0].attention.linears[-1]).weight).numpy()
    assert any(_same(a, kept) for a in init_after.values())  # the value check can see weights at all


def _same(a: np.ndarray, weight: np.ndarray) -> bool:
    return (a.shape == weight.shape and np.array_equal(a, weight)) or (
        a.shape == weight.T.shape and np.array_equal(a, weight.T)
    )


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("remove=1,keep=0.5", "not both"),
        ("keep=0", r"keep must be in \(0, 1\]"),
        ("keep=1.5", r"keep must be in \(0, 1\]"),
        ("remove=-1", "remove must be >= 0"),
        ("rank=0", "rank must be >= 1"),
        ("metric=magic", "cosine, loss, kl"),
        ("target=heads", "attention, mlp, block"),
        ("recover=distill", "none, bias, lowrank"),
        ("layers=1,1", "twice"),
        ("layers=1,remove=1", "excludes"),
    ],
)
def test_bad_options_fail_at_parse(options: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pipeline(f"prune{{{options}}}")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("llama", "remove=3", "cannot remove 3 attention layers: the model has 2"),
        ("llama", "remove=2", r"only 1 are unprotected \[1\]"),
        ("llama", "remove=1,protect=0,1", "covers every attention layer"),
        ("llama", "layers=5", r"layers=\[5\]"),
        ("llama", "protect=9", r"protect=\[9\]"),
        ("llama", "layers=0", "protected"),
        ("bert", "metric=loss,remove=1", "needs a causal LM"),
        ("llama", "remove=1", "calibration"),
    ],
)
def test_bad_options_for_the_model_fail_in_requires(name: str, options: str, message: str) -> None:
    calib = None if message == "calibration" else CALIB
    with pytest.raises(ValueError, match=message):
        _prune(_captured(name), options, calib=calib)


@settings(max_examples=25, deadline=None)
@given(keep=st.floats(min_value=1e-3, max_value=1.0))
def test_keep_never_keeps_fewer_layers_than_asked(keep: float) -> None:
    program = _captured("tiny")
    units = units_of(analyze(program), "attention")
    p = pa.PruneAttention(pa.PruneAttention.Config(keep=keep, protect=()))
    _, _, count = p._plan(program)
    assert len(units) - count >= keep * len(units) - 1e-9
    assert len(units) - count - 1 < keep * len(units)  # and removes as many as allowed
    assert math.isclose(count, math.floor(len(units) * (1 - keep) + 1e-9))
