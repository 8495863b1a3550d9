"""Structure analysis on the zoo: expectations come from each model's config, never from the analyser."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmopt.analysis.analyze import analyze
from slmopt.analysis.structure import Structure
from slmopt.program import ModelInfo, Program, capture
from tests.models import (
    ZOO,
    LogitsOnly,
    TinyConfig,
    TinyTransformerLM,
    ToyBlock,
    build_model,
    example_ids,
    toy_block,
    zoo_config,
)

# HF's activation names -> slmopt's.
_ACT = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "relu": "relu",
}


@dataclass(frozen=True)
class Expected:
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    ffn_kind: str
    activation: str
    width: int
    norm: str
    fused_qkv: bool = False
    transposed: bool = False
    post_norm: bool = False
    lm_head: bool = True
    qkv_bias: bool = True
    o_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def expected(name: str) -> Expected:
    c = zoo_config(name)
    if name == "gpt2":
        return Expected(
            c.n_layer, c.n_embd, c.vocab_size, c.n_head, c.n_head, "mlp", _ACT[c.activation_function],
            c.n_inner or 4 * c.n_embd, "layernorm", fused_qkv=True, transposed=True,
        )  # fmt: skip
    if name in ("llama", "qwen2"):
        return Expected(
            c.num_hidden_layers, c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_key_value_heads,
            "gated", _ACT[c.hidden_act], c.intermediate_size, "rmsnorm",
            qkv_bias=name == "qwen2" or c.attention_bias, o_bias=getattr(c, "attention_bias", False),
        )  # fmt: skip
    if name == "bert":
        return Expected(
            c.num_hidden_layers, c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_attention_heads,
            "mlp", _ACT[c.hidden_act], c.intermediate_size, "layernorm", post_norm=True, lm_head=False,
        )  # fmt: skip
    assert isinstance(c, TinyConfig)  # the hand-written model: nn.Linear everywhere, F.gelu (erf)
    return Expected(
        c.num_hidden_layers, c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_attention_heads,
        "mlp", "gelu", c.intermediate_size, "layernorm",
    )  # fmt: skip


_STRUCTURES: dict[str, Structure] = {}


@pytest.fixture(params=list(ZOO))
def case(request: pytest.FixtureRequest, zoo) -> tuple[Program, Structure, Expected]:
    name = request.param
    if name not in _STRUCTURES:
        _STRUCTURES[name] = analyze(zoo[name])
    return zoo[name], _STRUCTURES[name], expected(name)


def test_blocks_and_attention_heads(case) -> None:
    _, s, e = case
    assert len(s.blocks) == e.layers
    assert [b.index for b in s.blocks] == list(range(e.layers))
    assert s.hidden_size == e.hidden
    for b in s.blocks:
        a = b.attention
        assert a is not None and a.block == b.index
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (e.heads, e.kv_heads, e.head_dim)


def test_ffn_kind_activation_width(case) -> None:
    _, s, e = case
    for b in s.blocks:
        f = b.ffn
        assert f is not None and f.block == b.index
        assert (f.kind, f.activation, f.width) == (e.ffn_kind, e.activation, e.width)
        assert (f.gate is not None) == (e.ffn_kind == "gated")


def test_every_projection_has_its_role_and_shape(case) -> None:
    prog, s, e = case
    h, d, w = e.hidden, e.head_dim, e.width
    shapes = {
        "q": (h, e.heads * d), "k": (h, e.kv_heads * d), "v": (h, e.kv_heads * d),
        "qkv": (h, (e.heads + 2 * e.kv_heads) * d), "o": (e.heads * d, h),
        "up": (h, w), "gate": (h, w), "down": (w, h),
    }  # fmt: skip
    roles = ["qkv"] if e.fused_qkv else ["q", "k", "v"]
    roles += ["o", "up", "down"] + (["gate"] if e.ffn_kind == "gated" else [])
    for b in s.blocks:
        mine = [lin for lin in s.linears if lin.block == b.index]
        assert sorted(lin.role for lin in mine) == sorted(roles)
        for lin in mine:
            assert (lin.in_features, lin.out_features) == shapes[lin.role], lin
            assert lin.transposed is e.transposed
            stored = tuple(prog.param(lin.weight).shape)
            assert stored == ((lin.in_features, lin.out_features) if e.transposed else shapes[lin.role][::-1])
        by_role = {lin.role: lin for lin in mine}
        if not e.fused_qkv:
            assert all((by_role[r].bias is not None) == e.qkv_bias for r in "qkv")
            assert (by_role["o"].bias is not None) == e.o_bias
        assert b.attention.linears == [by_role[r].node for r in roles if r not in ("up", "down", "gate")]
        ffn = b.ffn
        assert (ffn.up.node, ffn.down.node) == (by_role["up"].node, by_role["down"].node)


def test_residual_wiring_names_real_nodes(case) -> None:
    prog, s, _ = case
    nodes = {n.name: n for n in prog.graph.nodes}
    for b in s.blocks:
        for sub in (b.attention, b.ffn):
            add = nodes[sub.residual_add]
            assert add.target is torch.ops.aten.add.Tensor
            assert {a.name for a in add.args} == {sub.residual, sub.branch_output}
            assert sub.branch_input in nodes


def test_norms_pre_or_post(case) -> None:
    _, s, e = case
    for b in s.blocks:
        assert [n.kind for n in b.norms] == [e.norm, e.norm]
        assert all(n.weight is not None for n in b.norms)
        for sub in (b.attention, b.ffn):
            assert (sub.post_norm is not None) is e.post_norm
            # Pre-norm: the branch reads a norm's output; post-norm: it reads the stream itself.
            assert (sub.branch_input == sub.residual) is e.post_norm
            if not e.post_norm:
                assert sub.branch_input in {n.node for n in b.norms}
    assert (s.final_norm is not None) is not e.post_norm


def test_lm_head_and_embedding(case) -> None:
    prog, s, e = case
    assert s.embedding is not None
    assert tuple(prog.param(s.embedding).shape) == (e.vocab, e.hidden)
    assert s.embedding_params == e.vocab * e.hidden
    if e.lm_head:
        head = s.lm_head
        assert head is not None and head.role == "lm_head" and head.block is None
        assert (head.in_features, head.out_features) == (e.hidden, e.vocab)
    else:
        assert s.lm_head is None
        assert all(lin.role != "lm_head" for lin in s.linears)


def test_nothing_unclassified_and_params_add_up(case) -> None:
    prog, s, _ = case
    assert s.unclassified == []
    assert all(lin.role != "other" for lin in s.linears)
    assert s.params == prog.num_params()
    assert 0 < sum(b.params for b in s.blocks) < s.params


def test_summary_is_readable(case) -> None:
    _, s, e = case
    text = s.summary(verbose=True)
    assert text.startswith(f"{e.layers} blocks, hidden {e.hidden}")
    assert f"{e.heads}/{e.kv_heads} x {e.head_dim}" in text
    assert f"{e.ffn_kind} {e.activation} x{e.width}" in text
    assert "unclassified: none" in text
    assert len(s.format_table().splitlines()) == e.layers + 1


def test_analyze_is_read_only_and_deterministic(zoo) -> None:
    prog = zoo.fresh("tiny")
    before = prog.graph_module.code
    assert analyze(prog).to_dict() == analyze(prog).to_dict()
    assert prog.graph_module.code == before


# --------------------------------------------------------------------------------------------------
# Beyond the zoo: other attention spellings, static shapes, pruned graphs, unknown branches.


def _capture(module: nn.Module, x: torch.Tensor, kind: str = "module", **info: object) -> Program:
    return capture(module.eval(), (x,), ModelInfo(kind=kind, source="test", input_names=["x"], **info))


def test_softmax_attention_with_gqa_repeat_kv() -> None:
    cfg = zoo_config("llama")
    cfg._attn_implementation = "eager"  # matmul/softmax/matmul with repeat_kv instead of sdpa
    torch.manual_seed(0)
    raw = type(build_model("llama"))(cfg)
    s = analyze(_capture(LogitsOnly(raw), example_ids(), "causal-lm", max_seq_len=64))
    assert s.unclassified == []
    for b in s.blocks:
        assert "softmax" in b.attention.sdpa
        assert (b.attention.num_heads, b.attention.num_kv_heads) == (4, 2)


def test_static_shapes_give_the_same_heads() -> None:
    model = TinyTransformerLM(TinyConfig(num_attention_heads=6)).eval()
    s = analyze(_capture(model, example_ids(), "causal-lm", dynamic_dims=[{}]))
    assert [(b.attention.num_heads, b.attention.head_dim) for b in s.blocks] == [(6, 8), (6, 8)]


def test_factory_block_module() -> None:
    module, (x,) = toy_block()
    s = analyze(_capture(module, x))
    assert len(s.blocks) == 1 and s.unclassified == []
    b = s.blocks[0]
    assert (b.attention.num_heads, b.attention.head_dim, b.ffn.kind, b.ffn.activation) == (
        4,
        8,
        "gated",
        "silu",
    )
    assert s.embedding is None and s.lm_head is None and s.hidden_size == 32


def test_block_without_attention_after_pruning(zoo) -> None:
    prog = zoo.fresh("tiny")
    attn = analyze(prog).blocks[1].attention
    nodes = {n.name: n for n in prog.graph.nodes}
    nodes[attn.residual_add].replace_all_uses_with(nodes[attn.residual])
    prog.recompile()
    s = analyze(prog)
    assert s.unclassified == []
    assert [(b.attention is not None, b.ffn is not None) for b in s.blocks] == [(True, True), (False, True)]


class _MLPResidual(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act, self.fc1, self.fc2 = act, nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    ("act", "name"),
    [
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (lambda x: 0.5 * x * (1.0 + torch.erf(x / 2**0.5)), "gelu"),
        (lambda x: x * torch.sigmoid(x), "silu"),
        (nn.SiLU(), "silu"),
        (nn.ReLU(), "relu"),
    ],
)
def test_activation_spellings(act, name: str) -> None:
    s = analyze(_capture(_MLPResidual(act), torch.randn(2, 16, 32)))
    assert s.unclassified == [] and s.blocks[0].ffn.activation == name


class _OddBranch(nn.Module):
    """A recognisable block followed by a residual branch that is neither attention nor an FFN."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.block = kind, ToyBlock()
        self.lin, self.lin2, self.lin3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        if self.kind == "conv":
            return x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        if self.kind == "linear":
            return x + self.lin(x)
        if self.kind == "three_linears":
            return x + self.lin3(F.relu(self.lin2(F.relu(self.lin(x)))))
        h = self.lin(x)  # QuickGELU: an activation the matchers do not know must not be guessed
        return x + self.lin2(h * torch.sigmoid(1.702 * h))


@pytest.mark.parametrize("kind", ["linear", "conv", "three_linears", "quick_gelu"])
def test_unknown_branch_is_reported_not_guessed(kind: str) -> None:
    s = analyze(_capture(_OddBranch(kind), torch.randn(2, 16, 32)))
    assert len(s.blocks) == 1  # the ToyBlock is still found
    assert any(
        note.startswith("residual add") and "neither attention nor FFN" in note for note in s.unclassified
    )
    odd = [lin for lin in s.linears if lin.weight.startswith(("lin", "conv"))]
    assert all(lin.role == "other" and lin.block is None for lin in odd)
    assert all(f"linear '{lin.node}'" in "\n".join(s.unclassified) for lin in odd)
    assert "unclassified:\n  - residual add" in s.summary()


@pytest.mark.slow
def test_twelve_layer_graph_analyses_in_under_a_second() -> None:
    cfg = TinyConfig(num_hidden_layers=12, hidden_size=32, intermediate_size=64)
    prog = _capture(TinyTransformerLM(cfg), example_ids(), "causal-lm", max_seq_len=64)
    start = time.perf_counter()
    s = analyze(prog)
    assert time.perf_counter() - start < 1.0
    assert len(s.blocks) == 12 and s.unclassified == []
