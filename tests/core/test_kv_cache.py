"""KV-cache transform and the ONNX decoder: exact greedy tokens vs the original HF model, cache contract.

References are independent: Hugging Face models run without a cache (full recompute every step), and a
hand-written softmax attention for :func:`attend_with_cache`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import onnx
import pytest
import torch

from slmopt.backends.onnxrt.generation import DECODER_FILE, GENAI_CONFIG, GENERATION_META, lower_generation
from slmopt.errors import UserError
from slmopt.generation.generate import Generator, TorchDecoder
from slmopt.generation.kv_cache import add_kv_cache, attend_with_cache, empty_past
from slmopt.loaders import load_program
from slmopt.program import Program
from tests.helpers import hf_greedy, run_pipeline
from tests.models import build_model, capture_model, example_ids, zoo_config

NEW_TOKENS = 32
PROMPT = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _tinylm_shaped() -> torch.nn.Module:
    """LlamaForCausalLM with the reference tinylm's shape (random init, fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6,
        initializer_range=0.1,  # the default 0.02 gives near-flat logits and degenerate repeats
    )  # fmt: skip
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval()


def gpt2_untied() -> torch.nn.Module:
    """The zoo GPT-2 with an untied, scaled head: the tied random-init one just repeats the last token."""
    from transformers import GPT2LMHeadModel

    cfg = zoo_config("gpt2")
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def _sharpened(name: str) -> torch.nn.Module:
    """A zoo model with its (untied) head scaled: random-init logits are otherwise close to ties."""
    model = build_model(name)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


_BUILDERS = {
    "tinylm": _tinylm_shaped,
    "gpt2": gpt2_untied,
    "llama": lambda: _sharpened("llama"),
    "qwen2": lambda: _sharpened("qwen2"),
}


@functools.cache
def _model(name: str) -> torch.nn.Module:
    return _BUILDERS[name]() if name in _BUILDERS else build_model(name)


@functools.cache
def _program(name: str) -> Program:
    if name in _BUILDERS:
        return load_program(_model(name))[0]
    return capture_model(name)


def _program_greedy(program: Program, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        ids = torch.cat([ids, program(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _prompt(vocab: int, batch: int = 3) -> torch.Tensor:
    return example_ids(batch=batch, seq=PROMPT, vocab=vocab, seed=7)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """decoder.onnx folders, built once per model on first use."""
    built: dict[str, Path] = {}

    def get(name: str, program: Program | None = None) -> Path:
        if name not in built:
            folder = tmp_path_factory.mktemp(f"engine-{name}")
            lower_generation(program or _program(name), folder, opset=18)
            built[name] = folder
        return built[name]

    return get  # type: ignore[return-value]


def test_attend_with_cache_matches_hand_written_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 8, generator=gen)
    k, v = torch.randn(2, 2, 3, 8, generator=gen), torch.randn(2, 2, 3, 8, generator=gen)
    pk, pv = torch.randn(2, 2, 4, 8, generator=gen), torch.randn(2, 2, 4, 8, generator=gen)
    out, keys, values = attend_with_cache(q, k, v, pk, pv, scale=0.3)
    full_k, full_v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    ref = torch.empty_like(q)
    for h in range(6):  # query head h reads KV head h // 3 (HF's repeat_kv order)
        scores = q[:, h] @ full_k[:, h // 3].transpose(-1, -2) * 0.3
        for i in range(3):  # query i sits at position 4 + i and sees keys 0..4+i
            scores[:, i, 4 + i + 1 :] = float("-inf")
        ref[:, h] = torch.softmax(scores, -1) @ full_v[:, h // 3]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(keys, full_k) and torch.equal(values, full_v)


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
def test_prefill_then_decode_matches_full_forward(name: str) -> None:
    program = _program(name)
    cached, layout = add_kv_cache(program)
    assert layout.input_names()[1:3] == ["past_key_values.0.key", "past_key_values.0.value"]
    ids = example_ids(batch=3, seq=9, seed=3)  # batch 3: not the example batch
    full = program(ids)
    logits, *present = cached.graph_module(ids[:, :5], *empty_past(layout, 3))  # P = 0
    torch.testing.assert_close(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    assert [tuple(t.shape) for t in present[:2]] == [
        (3, layout.slots[0].num_kv_heads, 5, layout.slots[0].head_dim)
    ] * 2
    for t in range(5, 9):  # one token at a time, past growing 5..8
        step, *present = cached.graph_module(ids[:, t : t + 1], *present)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert present[0].shape[2] == 9


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "tinylm"])
def test_onnx_greedy_equals_hf_full_recompute(name: str, engines) -> None:
    model = _model(name)
    folder = engines(name)
    prompt = _prompt(model.config.vocab_size)
    expected, gap = hf_greedy(model, prompt, NEW_TOKENS)
    assert gap > 1e-4, f"near-tie in the reference (gap {gap:.2g}); pick another prompt"
    assert all(len(set(row[PROMPT:].tolist())) >= 4 for row in expected)  # not a degenerate repeat
    got = Generator.from_engine(folder, threads=1).generate(prompt, NEW_TOKENS, stop_at_eos=False)
    assert torch.equal(got, expected)
    # The ONNX contract: named cache inputs/outputs with dynamic batch and past length.
    proto = onnx.load(str(folder / DECODER_FILE), load_external_data=False)
    n = model.config.num_hidden_layers
    inputs = [i.name for i in proto.graph.input]
    assert inputs == ["input_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")
    ]
    assert [o.name for o in proto.graph.output][1:3] == ["present.0.key", "present.0.value"]
    past_dims = [d.dim_param or d.dim_value for d in proto.graph.input[1].type.tensor_type.shape.dim]
    assert isinstance(past_dims[0], str) and isinstance(past_dims[2], str)  # batch, past: symbolic
    config = json.loads((folder / GENAI_CONFIG).read_text())
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    assert config["model"]["decoder"]["num_key_value_heads"] == kv_heads
    meta = json.loads((folder / GENERATION_META).read_text())
    assert [s["block"] for s in meta["slots"]] == list(range(n))


def _transformed(spec: str) -> Program:
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return run_pipeline(_program("tinylm"), spec, calib)[1]


def test_pruned_attention_has_no_cache_slot_and_fewer_kv_bytes(engines) -> None:
    full_layout = add_kv_cache(_program("tinylm"), check=False)[1]
    pruned = _transformed("prune-attn{layers=1,3}")
    layout = add_kv_cache(pruned)[1]
    assert [s.block for s in layout.slots] == [0, 2]
    assert len(layout.input_names()) - 1 == 2 * (4 - 2)
    assert layout.kv_bytes_per_token() * 4 == full_layout.kv_bytes_per_token() * 2  # ratio (L-k)/L
    assert full_layout.kv_bytes_per_token() == 4 * 2 * 2 * 32 * 4  # layers x (K,V) x Hkv x D x fp32
    folder = engines("tinylm-pruned", pruned)
    proto = onnx.load(str(folder / DECODER_FILE), load_external_data=False)
    assert sum(i.name.startswith("past_key_values.") for i in proto.graph.input) == 4
    meta = json.loads((folder / GENERATION_META).read_text())
    assert meta["kv_bytes_per_token"] * 2 == full_layout.kv_bytes_per_token()
    prompt = _prompt(256, batch=2)
    expected = _program_greedy(pruned, prompt, NEW_TOKENS)
    assert torch.equal(
        Generator.from_engine(folder, threads=1).generate(prompt, NEW_TOKENS, stop_at_eos=False), expected
    )


def test_composes_with_fff() -> None:
    program = _transformed("prune-attn{layers=3},fff{depth=1,distill_steps=0}")
    assert any("fff" in str(n.target) for n in program.graph.nodes)
    cached, layout = add_kv_cache(program)
    assert len(layout.slots) == 3
    prompt = _prompt(256, batch=2)
    expected = _program_greedy(program, prompt, 16)
    got = Generator(TorchDecoder(cached, layout)).generate(prompt, 16, stop_at_eos=False)
    assert torch.equal(got, expected)


def test_unsupported_models_get_one_clear_error() -> None:
    with pytest.raises(UserError, match="hand-written softmax"):
        add_kv_cache(capture_model("tiny"))
    with pytest.raises(UserError, match="causal LM"):
        add_kv_cache(capture_model("bert"))


def test_self_check_refuses_a_wrong_cache_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    import slmopt.generation.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "_offset_positions", lambda *args: 0)  # positions never advance
    with pytest.raises(UserError, match="not supported for this llama model"):
        add_kv_cache(_program("llama"))


def test_capture_leaves_the_users_model_in_eval_mode() -> None:
    from slmopt.loaders import LogitsOnly
    from slmopt.program import ModelInfo, capture

    model = build_model("gpt2")  # eval mode; the fresh wrapper around it is in train mode
    capture(LogitsOnly(model), (example_ids(),), ModelInfo(kind="causal-lm", source="t", vocab_size=128))
    assert not any(m.training for m in model.modules())  # dropout stays off for the user


def test_transform_shares_weights_and_leaves_the_program_unchanged():
    program = capture_model("llama")
    ids = example_ids()
    before = program(ids).clone()
    weights = dict(program.graph_module.named_parameters())
    cached, layout = add_kv_cache(program)
    # No second copy of the weights (lowering a large model would hold two), and the input is untouched.
    shared = dict(cached.graph_module.named_parameters())
    assert all(shared[name] is tensor for name, tensor in weights.items() if name in shared)
    assert len(shared) > 0
    assert [n.op for n in program.graph.nodes].count("placeholder") == 1
    torch.testing.assert_close(program(ids), before, rtol=0, atol=0)
    logits, *_ = cached.graph_module(ids, *empty_past(layout, ids.shape[0]))
    torch.testing.assert_close(logits, before, rtol=1e-5, atol=1e-5)
