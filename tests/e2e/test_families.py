"""Real SLM families through analysis and every pass: ONNX Runtime parity, coverage, hooked HF references.

For each family in :mod:`tests.families` (Phi-3's fused gate/up, GPT-NeoX's parallel residual, ...):

* analysis classifies every block linear (nothing ``unclassified``);
* ``mask-2to4``, ``prune-attn``, ``fff`` and ``elastic{budgets=0.5}`` run; the lowered ONNX model matches the
  transformed torch program within 1e-4; mask-2to4 leaves every block linear 2:4 sparse;
* attention removal equals the Hugging Face model with that attention module's output zeroed by a forward
  hook (the independent reference), and greedy decoding of the compiled KV-cache engine equals HF greedy
  decoding without a cache, for the plain model and the pruned one;
* the elastic subnet lands within ±3 % of its parameter budget.

Each outcome is recorded for the README support matrix (``benchmarks/support_matrix.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from slmopt.analysis import analyze
from slmopt.backends.onnxrt.export import export_onnx
from slmopt.backends.onnxrt.generation import OnnxDecoder, lower_generation
from slmopt.errors import UserError
from slmopt.generation.generate import Generator
from slmopt.passes.fff.convert import DenseFFN
from slmopt.pipeline import PassContext, PassManager, parse_pipeline
from slmopt.program import Program
from tests.families import FAMILIES, available, build_family, capture_family
from tests.helpers import hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

# The default run covers one family per pattern the acceptance names (fused gate/up, parallel residual,
# matmul projections, sandwich norms, scaled residuals, q/k norms); the support matrix script sets
# SLMOPT_ALL_FAMILIES=1 to run every family (about 6 CPU-minutes on this machine instead of 3).
CORE = ("phi3", "gpt_neox", "falcon", "gemma2", "granite", "qwen3", "cohere")
ALL = os.environ.get("SLMOPT_ALL_FAMILIES") == "1"
# The other families are not collected by default (rather than skipped: nothing here is skipped forever).
NAMES = [pytest.param(n) for n in FAMILIES if available(n) and (ALL or n in CORE)]
# Gaps the support matrix explains; each is a strict xfail, so a fix shows up as an unexpected pass.
_NO_KV_CACHE = (
    "HF writes this attention by hand (no SDPA: {}); the KV-cache transform needs "
    "scaled_dot_product_attention"
)
KNOWN_GAPS = {
    ("gemma2", "generate"): _NO_KV_CACHE.format("logit soft-capping"),
    ("bloom", "generate"): _NO_KV_CACHE.format("ALiBi via baddbmm"),
    ("mpt", "generate"): _NO_KV_CACHE.format("ALiBi"),
    ("bloom", "elastic"): "heads are folded into the batch by a computed (not constant) reshape size",
}


def _params(*checks: str) -> list:
    """``(family, check)`` params, with a strict xfail on a known gap."""
    out = []
    for param in NAMES:
        name = param.values[0]
        for check in checks:
            marks = list(param.marks)
            if (name, check) in KNOWN_GAPS:
                marks.append(pytest.mark.xfail(reason=KNOWN_GAPS[name, check], strict=True, raises=UserError))
            out.append(pytest.param(name, check, marks=marks, id=f"{check}-{name}"))
    return out


PIPELINES = {
    "mask-2to4": "mask-2to4{method=magnitude}",
    # ``ops`` lowers the tree with standard ONNX ops (exact erf GELU); ORT's MoE op approximates GELU.
    "fff": "fff{depth=1,distill_steps=0,lowering=ops,refit=none}",
    "elastic": "elastic{budgets=0.5,refine=0,score_samples=4}",
}
PRUNE = "prune-attn{layers=1,recover=none}"  # layer 1: layer 0 is protected by default
PARITY = 1e-4
NEW_TOKENS, PROMPT = 12, 6
RESULTS = os.environ.get("SLMOPT_SUPPORT_RESULTS")  # a JSON-lines file the matrix script reads


def _record(family: str, check: str, ok: bool, detail: str = "") -> None:
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"family": family, "check": check, "ok": ok, "detail": detail}) + "\n")


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"


def _ids(seq: int = 16, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


class _PerFamily(dict):
    """A dict that builds a missing family's value on first use (module fixtures share work)."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, name: str):
        self[name] = self.make(name)
        return self[name]


@pytest.fixture(scope="module")
def captured() -> dict[str, Program]:
    """One capture per family (passes work on clones)."""
    return _PerFamily(capture_family)


@pytest.fixture(scope="module")
def pruned(captured) -> dict[str, Program]:
    """Each family with block 1's attention removed (shared by the HF-hook, parity and generation tests)."""
    return _PerFamily(lambda name: _run(captured[name], PRUNE))


def _run(program: Program, spec: str) -> Program:
    ctx = PassContext(calib=_ids(seq=16, batch=4, seed=1), progress=False)
    manager = PassManager(parse_pipeline(spec))
    new, _ = manager.run(program.clone(), ctx)
    return manager.variants["0.5"][0] if spec.startswith("elastic") else new


def _ort_max_diff(program: Program, path: Path, ids: torch.Tensor) -> float:
    export_onnx(program, path, opset=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    return float(np.abs(got - program(ids).numpy()).max())


def _block_linears(program: Program) -> list:
    return [lin for lin in analyze(program).linears if lin.block is not None]


@pytest.mark.parametrize("name", NAMES)
def test_analysis_classifies_every_block_linear(name: str, captured) -> None:
    structure = analyze(captured[name])
    layers = FAMILIES[name].layers
    ok = not structure.unclassified and len(structure.blocks) == layers
    _record(name, "analysis", ok, "; ".join(structure.unclassified)[:200])
    assert structure.unclassified == []
    assert len(structure.blocks) == layers
    assert all(b.attention is not None and b.ffn is not None for b in structure.blocks)
    assert structure.lm_head is not None


@pytest.mark.parametrize(("name", "pass_name"), _params(*PIPELINES, "prune-attn"))
def test_pass_runs_and_onnx_matches_the_transformed_program(
    name: str, pass_name: str, captured, pruned, tmp_path: Path
) -> None:
    original = captured[name]
    try:
        new = pruned[name] if pass_name == "prune-attn" else _run(original, PIPELINES[pass_name])
        diff = _ort_max_diff(new, tmp_path / "model.onnx", _ids(seq=11, batch=3))
    except Exception as err:
        _record(name, pass_name, False, _failure(err))
        raise
    ok = diff <= PARITY
    if pass_name == "mask-2to4":  # every block linear covered: 2 of every 4 weights along `in` are zero
        for lin in _block_linears(original):
            w = new.param(lin.weight)
            rows = w.T if lin.transposed else w  # [out, in]: groups of 4 run along `in`
            ok &= bool(((rows.reshape(rows.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    detail = f"ORT max |diff| {diff:.2e}"
    if pass_name == "elastic":
        fraction = new.num_params() / original.num_params()
        ok &= abs(fraction - 0.5) <= 0.03 * 0.5
        detail += f", {fraction:.3f} of the parameters"
    _record(name, pass_name, ok, detail)
    assert diff <= PARITY
    assert ok


@pytest.mark.parametrize("name", NAMES)
def test_attention_removal_equals_hf_with_the_attention_output_zeroed(name: str, captured, pruned) -> None:
    try:
        program = pruned[name]
    except Exception as err:
        _record(name, "prune-attn", False, _failure(err))
        raise
    ids = _ids(seq=12, batch=2, seed=5)
    reference = _hooked(name, 1)
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
    diff = float((program(ids) - expected).abs().max())
    # Everything the attention module owns left the program (no export check node keeps q/k norms alive).
    attention = FAMILIES[name].attention.format(i=1)
    owned = sum(p.numel() for p in reference.get_submodule(attention).parameters())
    gone = captured[name].num_params() - program.num_params()
    _record(name, "prune-attn-vs-hf", diff <= 1e-4 and gone >= owned, f"max |diff| {diff:.2e}")
    assert diff <= 1e-4
    assert gone >= owned


@pytest.mark.parametrize(("name", "check"), _params("generate"))
@pytest.mark.parametrize("prune", [False, True], ids=["plain", "prune-attn"])
def test_kv_cache_engine_greedy_equals_hf_without_cache(
    name: str, check: str, prune: bool, captured, pruned, tmp_path: Path
) -> None:
    """Greedy ids of the compiled decoder vs HF without a cache; for the pruned model the decoder's prefill
    (empty past) is also the ONNX Runtime parity check of prune-attn."""
    program = pruned[name] if prune else captured[name]
    prompt = _ids(seq=PROMPT, batch=2, seed=7)
    try:
        lower_generation(program, tmp_path, opset=18)
        got = Generator.from_engine(tmp_path, threads=1).generate(prompt, NEW_TOKENS, stop_at_eos=False)
    except Exception as err:
        _record(name, "generate", False, _failure(err))
        raise
    expected, _ = hf_greedy(_hooked(name, 1) if prune else build_family(name), prompt, NEW_TOKENS)
    same = bool(torch.equal(got, expected))
    _record(name, "generate", same, "greedy ids vs HF without cache")
    assert torch.equal(got, expected)
    if prune:
        decoder = OnnxDecoder(tmp_path, threads=1)
        ids = _ids(seq=11, batch=3)
        logits, _ = decoder(ids, decoder.empty_past(3))
        diff = float((logits - program(ids)).abs().max())
        _record(name, "prune-attn", diff <= PARITY, f"ORT max |diff| {diff:.2e}")
        assert diff <= PARITY


def _hooked(name: str, layer: int) -> torch.nn.Module:
    """The HF model with block ``layer``'s attention output zeroed by a forward hook."""
    model = build_family(name)
    attention = model.get_submodule(FAMILIES[name].attention.format(i=layer))

    def zero(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else output * 0

    attention.register_forward_hook(zero)
    return model


def _expect_phi3(s) -> None:  # one gate_up weight, read as two paired halves
    f = s.blocks[0].ffn
    assert (f.kind, f.gate.rows, f.up.rows, f.width) == ("gated", (0, 96), (96, 192), 96)
    assert f.gate.weight == f.up.weight and s.linear(f.up.node).role == "gate_up"


def _expect_neox(s) -> None:  # parallel: both branches read the block input, each has its own add
    a, f = s.blocks[1].attention, s.blocks[1].ffn
    assert a.qkv_layout == "interleaved" and f.residual == a.residual_add
    assert a.branch_input != f.branch_input  # ln1(x) and ln2(x) of the same x


def _expect_gemma2(s) -> None:  # sandwich: a norm on each branch output before its add
    for info in (s.blocks[0].attention, s.blocks[0].ffn):
        assert info.branch_norm is not None and info.projection_output != info.branch_output


def _expect_granite(s) -> None:  # residual_multiplier: the branch ends in a constant scale
    f = s.blocks[0].ffn
    assert f.branch_norm is None and f.projection_output != f.branch_output


def _expect_qwen3(s) -> None:  # per-head q/k norms recorded for head cutting
    a = s.blocks[0].attention
    assert len(a.q_params) == 1 and len(a.k_params) == 1


def _expect_falcon(s) -> None:  # projections are `x @ W.T` matmuls
    assert {s.linear(n).role for n in s.blocks[0].attention.linears} == {"qkv", "o"}
    assert all(s.linear(n).node.startswith("matmul") for n in s.blocks[0].attention.linears)


EXPECT = {
    "phi3": _expect_phi3, "gpt_neox": _expect_neox, "gemma2": _expect_gemma2, "granite": _expect_granite,
    "qwen3": _expect_qwen3, "falcon": _expect_falcon,
}  # fmt: skip


@pytest.mark.parametrize("name", [n for n in EXPECT if available(n)])
def test_analysis_reads_each_pattern_and_is_idempotent(name: str, captured) -> None:
    program = captured[name].clone()
    first = analyze(program)
    EXPECT[name](first)
    # Canonicalising parallel sums happens once: a second analysis sees the same graph and node names.
    code = program.graph_module.code
    assert analyze(program).to_dict() == first.to_dict()
    assert program.graph_module.code == code


def test_fused_gate_up_reads_like_separate_projections(captured) -> None:
    """Phi-3's one gate_up weight, read by the FFF converter, computes the HF MLP itself (the reference)."""
    if not available("phi3"):
        pytest.skip("transformers has no Phi-3")

    ffn = analyze(captured["phi3"]).blocks[1].ffn
    dense = DenseFFN.from_program(captured["phi3"], ffn)
    mlp = build_family("phi3").model.layers[1].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(dense(x), mlp(x), rtol=1e-5, atol=1e-6)
    assert dense.gated and dense.width == 96
