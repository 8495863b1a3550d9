"""Tiny random-init models of the SLM families whose block structure differs from Llama's.

Each entry names the structural pattern it exercises (fused gate/up, parallel residual, sandwich norms,
scaled residual branches, ...) and where its attention module lives, so tests can zero that module's
output with a forward hook (the independent reference for attention removal). Models are 2 layers,
hidden 64, vocabulary 128: capture takes about a second. No pretrained weights are needed.

Example:
    >>> from tests.families import FAMILIES, build_family
    >>> model = build_family("phi3")  # doctest: +SKIP
    >>> FAMILIES["phi3"].pattern
    'fused gate/up (chunk) + fused qkv'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slmopt.loaders import LogitsOnly
from slmopt.program import ModelInfo, Program, capture

__all__ = ["FAMILIES", "Family", "available", "build_family", "capture_family"]

VOCAB = 128
_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


@dataclass(frozen=True)
class Family:
    """One family: its transformers classes, tiny config, the pattern it exercises, its attention path."""

    model_cls: str
    config_cls: str
    config: dict[str, Any]
    pattern: str
    attention: str  # module path of block i's attention, with {i}
    layers: int = 2


FAMILIES: dict[str, Family] = {
    "phi3": Family(
        "Phi3ForCausalLM", "Phi3Config",
        {**_COMMON, "intermediate_size": 96, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "fused gate/up (chunk) + fused qkv", "model.layers.{i}.self_attn",
    ),
    "gpt_neox": Family(
        "GPTNeoXForCausalLM", "GPTNeoXConfig",
        {**_COMMON, "intermediate_size": 96, "use_parallel_residual": True, "max_position_embeddings": 64,
         "bos_token_id": 1, "eos_token_id": 2},
        "parallel residual + interleaved qkv", "gpt_neox.layers.{i}.attention",
    ),
    "phi": Family(
        "PhiForCausalLM", "PhiConfig",
        {**_COMMON, "intermediate_size": 96, "max_position_embeddings": 64},
        "parallel residual, one shared norm", "model.layers.{i}.self_attn",
    ),
    "gptj": Family(
        "GPTJForCausalLM", "GPTJConfig",
        {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 8,
         "bos_token_id": 1, "eos_token_id": 2},
        "parallel residual, one shared norm", "transformer.h.{i}.attn",
    ),
    "falcon": Family(
        "FalconForCausalLM", "FalconConfig",
        {**_COMMON, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2},
        "parallel residual (in-place add_), matmul projections, multi-query qkv",
        "transformer.h.{i}.self_attention",
    ),
    "cohere": Family(
        "CohereForCausalLM", "CohereConfig",
        {**_COMMON, "intermediate_size": 96, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "use_qk_norm": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "parallel residual (chain form), per-head q/k norms, scaled logits", "model.layers.{i}.self_attn",
    ),
    "gemma2": Family(
        "Gemma2ForCausalLM", "Gemma2Config",
        {**_COMMON, "intermediate_size": 96, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "branch-output (sandwich) norms, soft-capping", "model.layers.{i}.self_attn",
    ),
    "granite": Family(
        "GraniteForCausalLM", "GraniteConfig",
        {**_COMMON, "intermediate_size": 96, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "residual_multiplier": 0.5, "embedding_multiplier": 2.0, "attention_multiplier": 0.25,
         "logits_scaling": 2.0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "constant-scaled residual branches", "model.layers.{i}.self_attn",
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM", "Qwen3Config",
        {**_COMMON, "intermediate_size": 96, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 64},
        "per-head q/k norms", "model.layers.{i}.self_attn",
    ),
    "olmo2": Family(
        "Olmo2ForCausalLM", "Olmo2Config",
        {**_COMMON, "intermediate_size": 96, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "branch-output norms only (no pre-norm), q/k norms", "model.layers.{i}.self_attn",
    ),
    "codegen": Family(
        "CodeGenForCausalLM", "CodeGenConfig",
        {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 8,
         "bos_token_id": 1, "eos_token_id": 2},
        "parallel residual, fused qkv in model-parallel order", "transformer.h.{i}.attn",
    ),
    "gpt_bigcode": Family(
        "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
        {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
         "bos_token_id": 1, "eos_token_id": 2},
        "fused multi-query qkv (addmm)", "transformer.h.{i}.attn",
    ),
    "bloom": Family(
        "BloomForCausalLM", "BloomConfig",
        {"vocab_size": VOCAB, "hidden_size": 64, "n_layer": 2, "n_head": 4, "bos_token_id": 1,
         "eos_token_id": 2},
        "ALiBi attention scored with baddbmm, heads folded into the batch, interleaved qkv",
        # BLOOM's attention module adds the residual itself: zero its output projection instead.
        "transformer.h.{i}.self_attention.dense",
    ),
    "mpt": Family(
        "MptForCausalLM", "MptConfig",
        {"vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64,
         "bos_token_id": 1, "eos_token_id": 2},
        "ALiBi, fused Wqkv, context length from max_seq_len", "transformer.blocks.{i}.attn",
    ),
}  # fmt: skip


def available(name: str) -> bool:
    """True when the installed transformers has the family's model class."""
    import transformers

    return hasattr(transformers, FAMILIES[name].model_cls)


def build_family(name: str) -> nn.Module:
    """The seeded, eval-mode random-init model of family ``name`` (untied, sharpened LM head)."""
    import transformers

    fam = FAMILIES[name]
    config = getattr(transformers, fam.config_cls)(**fam.config, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, fam.model_cls)(config).eval()
    with torch.no_grad():  # random init gives near-flat logits; a sharper head makes greedy ids stable
        model.get_output_embeddings().weight.mul_(20)
    return model


def capture_family(name: str, model: nn.Module | None = None) -> Program:
    """Captures family ``name`` (or the given instance of it) with input ids ``[2, 16]``."""
    model = model if model is not None else build_family(name)
    cfg = model.config
    info = ModelInfo(
        kind="causal-lm",
        source=f"tests.families:{name}",
        vocab_size=cfg.vocab_size,
        max_seq_len=64,
        config=cfg.to_dict(),
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return capture(LogitsOnly(model).eval(), (ids,), info)


class _SoftplusFFN(nn.Module):
    """An FFN whose activation (softplus) analysis does not know: its block stays unclassified."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.softplus(self.fc1(self.norm(x))))


def planted_unclassifiable() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``module:factory`` entry: the zoo's tiny LM with one extra softplus FFN sublayer analysis cannot read.

    A pass asked to cover every block linear must refuse it (exit 2, one line), not run half-way.
    """
    from tests.models import SEED, TinyConfig, TinyTransformerLM, example_ids

    class Planted(TinyTransformerLM):
        def __init__(self) -> None:
            # Positions for the compile's verification windows (a factory module declares no context).
            super().__init__(TinyConfig(max_position_embeddings=512))
            self.odd = _SoftplusFFN(self.config.hidden_size)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.embed(input_ids) + self.pos(pos)
            for block in self.blocks:
                x = block(x)
            x = x + self.odd(x)
            return self.head(self.ln_f(x))

    torch.manual_seed(SEED)
    return Planted().eval(), (example_ids(),)
