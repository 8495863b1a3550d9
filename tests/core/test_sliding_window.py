"""Sliding-window attention in the KV cache: windows read from the graph, greedy tokens past the window.

The references are independent of slmopt: the Hugging Face model itself, run without a cache (full
recompute every step), its config's ``sliding_window``/``layer_types``, and a hand-written windowed softmax
attention. Windows are small (8 tokens) and generation runs well past them. Families: StarCoder2 and Mistral
(every layer windowed), Gemma-3 and Qwen2 (windowed and full layers mixed).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slmopt.backends.onnxrt.generation import lower_generation
from slmopt.errors import UserError
from slmopt.generation.generate import Generator, TorchDecoder
from slmopt.generation.kv_cache import add_kv_cache, attend_with_cache
from slmopt.generation.window import attention_windows, probe_length, window_pattern
from slmopt.loaders import load_program
from slmopt.program import ModelInfo, Program, capture
from tests.helpers import hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 8
PROMPT = 5
NEW_TOKENS = 28  # prompt + new tokens = 33: four windows


def _starcoder2() -> torch.nn.Module:
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    cfg = Starcoder2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=WINDOW, bos_token_id=0,
        eos_token_id=0, initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return Starcoder2ForCausalLM(cfg).eval()


def _gemma3() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=WINDOW,
        sliding_window_pattern=2, query_pre_attn_scalar=16, tie_word_embeddings=False, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


def _mistral() -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(sliding_window=WINDOW, **_SMALL)).eval()


def _qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Qwen2 windows only the layers from max_window_layers on: a mix of full and windowed layers.
    cfg = Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **_SMALL)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


_SMALL = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "initializer_range": 0.1, "tie_word_embeddings": False,
}  # fmt: skip
_BUILDERS = {"starcoder2": _starcoder2, "gemma3": _gemma3, "mistral": _mistral, "qwen2": _qwen2}
# ONNX and GenAI run on one all-windowed and one mixed family (an export costs seconds per model).
ENGINE_FAMILIES = ["starcoder2", "gemma3"]


@functools.cache
def _model(name: str) -> torch.nn.Module:
    model = _BUILDERS[name]()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # random-init logits are otherwise close to ties
    return model


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Program]:
    """Each model saved with ``save_pretrained`` and loaded the way the CLI loads a folder."""
    out = {}
    for name in _BUILDERS:
        folder = tmp_path_factory.mktemp(name)
        _model(name).save_pretrained(folder)
        out[name] = load_program(folder)[0]
    return out


@pytest.fixture(scope="module")
def engines(programs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``decoder.onnx`` folders (onnxruntime backend) of the ONNX-checked families."""
    out = {}
    for name in ENGINE_FAMILIES:
        out[name] = tmp_path_factory.mktemp(f"{name}-engine")
        lower_generation(programs[name], out[name], opset=18)
    return out


def _prompt() -> torch.Tensor:
    return torch.randint(0, 128, (2, PROMPT), generator=torch.Generator().manual_seed(5))


@functools.cache
def _expected(name: str) -> torch.Tensor:
    expected, gap = hf_greedy(_model(name), _prompt(), NEW_TOKENS)
    assert gap > 1e-4, f"near-tie in the reference (gap {gap:.2g}); pick another prompt"
    assert all(len(set(row[PROMPT + WINDOW :].tolist())) >= 4 for row in expected)  # not a repeat
    return expected


def _expected_windows(model: torch.nn.Module) -> list[int | None]:
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in types]


def test_window_pattern_and_windowed_attention_match_hand_written_softmax() -> None:
    assert window_pattern(5, 2).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1],
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=gen)
    k, v = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen)
    pk, pv = torch.randn(1, 2, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    out, _, _ = attend_with_cache(q, k, v, pk, pv, scale=0.5, window=4)
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    for h in range(4):
        for i in range(3):  # query i is at position 6 + i and sees keys 3 + i .. 6 + i
            pos = 6 + i
            scores = q[0, h, i] @ keys[0, h // 2, pos - 3 : pos + 1].T * 0.5
            ref = torch.softmax(scores, -1) @ values[0, h // 2, pos - 3 : pos + 1]
            torch.testing.assert_close(out[0, h, i], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(_BUILDERS))
def test_windows_are_read_from_the_graph(programs, name: str) -> None:
    cached, layout = add_kv_cache(programs[name])
    assert [s.window for s in layout.slots] == _expected_windows(_model(name))
    assert probe_length(programs[name].info.config, 128) == 128  # capped by the context


@pytest.mark.parametrize("name", list(_BUILDERS))
def test_greedy_past_the_window_equals_hf_without_cache(programs, name: str) -> None:
    cached, layout = add_kv_cache(programs[name])
    torch_gen = Generator(TorchDecoder(cached, layout))
    assert torch.equal(torch_gen.generate(_prompt(), NEW_TOKENS, stop_at_eos=False), _expected(name))


@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_onnx_decoder_past_the_window_equals_hf(engines, name: str) -> None:
    onnx_gen = Generator.from_engine(engines[name], threads=1)
    assert torch.equal(onnx_gen.generate(_prompt(), NEW_TOKENS, stop_at_eos=False), _expected(name))


@pytest.mark.parametrize("name", ENGINE_FAMILIES)
def test_genai_client_past_the_window_equals_hf(engines, name: str) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the dev extra")
    model = og.Model(str(engines[name]))
    for row, want in zip(_prompt().tolist(), _expected(name).tolist(), strict=True):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=PROMPT + NEW_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(row)
        while not generator.is_done():
            generator.generate_next_token()
        got = [int(t) for t in generator.get_sequence(0)]
        assert got == want  # neither reference continuation contains the model's EOS: no early stop


def test_self_check_compares_past_the_window(programs, monkeypatch: pytest.MonkeyPatch) -> None:
    import slmopt.generation.kv_cache as kv_cache

    # A cache that ignores the window agrees with the model inside the window only: the check must see it.
    monkeypatch.setattr(kv_cache, "attention_windows", lambda gm, sdpas, length: [None] * len(sdpas))
    with pytest.raises(UserError, match="not supported for this starcoder2 model"):
        add_kv_cache(programs["starcoder2"])


class _Bidirectional(torch.nn.Module):
    """Token ids -> logits through one SDPA whose mask lets every token see every other (not causal)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)[:, None]  # [B, 1, S, 16]
        seq = ids.shape[1]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=ids.device)
        return self.head(F.scaled_dot_product_attention(x, x, x, attn_mask=mask)[:, 0])


def test_a_mask_that_is_not_causal_is_refused_in_one_line() -> None:
    info = ModelInfo(kind="causal-lm", source="bidirectional", vocab_size=32, max_seq_len=64)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    program = capture(_Bidirectional().eval(), (ids,), info)
    sdpas = [
        n for n in program.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default
    ]
    with pytest.raises(UserError, match="neither causal nor a causal sliding window"):
        attention_windows(program.graph_module, sdpas, 32)
    with pytest.raises(UserError, match="neither causal nor a causal sliding window"):
        add_kv_cache(program)
