"""Tiny random-init model zoo shared by the whole test suite.

Every factory is seeded and small (hidden 32-64, 2 layers, vocab <= 128) so capture stays around a second.
No pretrained weights are needed (the test machines have no network).

Example:
    >>> from tests.models import capture_model, zoo_config
    >>> prog = capture_model("llama")
    >>> zoo_config("llama").num_key_value_heads
    2
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmopt.loaders import HiddenOnly, LogitsOnly
from slmopt.program import ModelInfo, Program, capture

__all__ = [
    "CAUSAL_LMS",
    "ENCODERS",
    "ZOO",
    "HiddenOnly",
    "LogitsOnly",
    "ToyBlock",
    "TinyConfig",
    "TinyTransformerLM",
    "build_model",
    "capture_model",
    "example_ids",
    "save_hf",
    "toy_block",
    "zoo_config",
]

VOCAB = 128
SEQ = 16
BATCH = 2
SEED = 0


# --------------------------------------------------------------------------------------------------
# Hand-written pre-norm transformer (no HF, no F.scaled_dot_product_attention).


class TinyConfig:
    """Config of :class:`TinyTransformerLM`, shaped like an HF config for uniform test expectations."""

    def __init__(
        self,
        vocab_size: int = VOCAB,
        hidden_size: int = 48,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 96,
        max_position_embeddings: int = 64,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings


class _TinyAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


class _TinyBlock(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden_size)
        self.attn = _TinyAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.ln2 = nn.LayerNorm(cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformerLM(nn.Module):
    """A plain pre-norm transformer LM: manual softmax(QKᵀ/√d)V, LayerNorm, GELU MLP, untied head."""

    def __init__(self, cfg: TinyConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or TinyConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(_TinyBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------------------------------
# A single block for ``package.module:factory`` loading.


class ToyBlock(nn.Module):
    """One pre-norm block taking a float tensor ``[batch, seq, hidden]`` (SwiGLU FFN, SDPA attention)."""

    def __init__(self, hidden: int = 32, heads: int = 4, ffn: int = 64) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.ModuleDict({n: nn.Linear(hidden, hidden, bias=False) for n in ("q", "k", "v")})
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden)
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        y = self.norm1(x)
        q, k, v = (self.qkv[n](y).view(b, s, self.heads, self.head_dim).transpose(1, 2) for n in "qkv")
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def toy_block(hidden: int = 32) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``module:factory`` entry point: returns ``(ToyBlock, (x,))`` with ``x`` of shape [2, 16, hidden]."""
    torch.manual_seed(SEED)
    return ToyBlock(hidden=hidden).eval(), (torch.randn(BATCH, SEQ, hidden),)


# --------------------------------------------------------------------------------------------------
# HF configs. Imported lazily so ``import tests.models`` stays cheap.


def _gpt2_config() -> Any:
    from transformers import GPT2Config

    # bos/eos default to 50256; keep them inside the tiny vocabulary.
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_inner=None,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )


def _llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _qwen2_config() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=64,
    )


def _hf_model(cls_name: str, cfg_fn: Callable[[], Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(SEED)
        model = getattr(transformers, cls_name)(cfg_fn())
        return model.eval()

    return build


def _tiny_model() -> nn.Module:
    torch.manual_seed(SEED)
    return TinyTransformerLM().eval()


# name -> (config factory, raw model factory, kind)
ZOO: dict[str, tuple[Callable[[], Any], Callable[[], nn.Module], str]] = {
    "gpt2": (_gpt2_config, _hf_model("GPT2LMHeadModel", _gpt2_config), "causal-lm"),
    "llama": (_llama_config, _hf_model("LlamaForCausalLM", _llama_config), "causal-lm"),
    "qwen2": (_qwen2_config, _hf_model("Qwen2ForCausalLM", _qwen2_config), "causal-lm"),
    "bert": (_bert_config, _hf_model("BertModel", _bert_config), "encoder"),
    "tiny": (TinyConfig, _tiny_model, "causal-lm"),
}
CAUSAL_LMS = [n for n, (_, _, kind) in ZOO.items() if kind == "causal-lm"]
ENCODERS = [n for n, (_, _, kind) in ZOO.items() if kind == "encoder"]


def zoo_config(name: str) -> Any:
    """Returns a fresh config of zoo model ``name`` (HF config, or :class:`TinyConfig`)."""
    return ZOO[name][0]()


def build_model(name: str) -> nn.Module:
    """Returns the raw (unwrapped, seeded, eval-mode) zoo model ``name``."""
    return ZOO[name][1]()


def example_ids(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = SEED) -> torch.Tensor:
    """Deterministic token ids ``[batch, seq]`` (export needs >= 2 along each dynamic axis)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def _wrapped(name: str) -> nn.Module:
    model = build_model(name)
    if name == "tiny":
        return model
    return HiddenOnly(model) if ZOO[name][2] == "encoder" else LogitsOnly(model)


def capture_model(name: str) -> Program:
    """Builds zoo model ``name`` and captures it into a Program (input ids [2, 16])."""
    cfg = zoo_config(name)
    info = ModelInfo(
        kind=ZOO[name][2],
        source=f"tests.models:{name}",
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_position_embeddings,
        config=cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg)),
    )
    return capture(_wrapped(name).eval(), (example_ids(vocab=cfg.vocab_size),), info)


def save_hf(name: str, directory: str | Path) -> Path:
    """Saves HF zoo model ``name`` with ``save_pretrained`` (safetensors) into ``directory``."""
    if name == "tiny":
        raise ValueError(
            "'tiny' is not a Hugging Face model; choose one of " + ", ".join(n for n in ZOO if n != "tiny")
        )
    out = Path(directory)
    build_model(name).save_pretrained(out, safe_serialization=True)
    return out
