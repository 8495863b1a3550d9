"""Text generation from a KV-cache engine: greedy or sampled decoding, streamed token by token.

A :class:`Generator` drives a *step function* ``(ids [B, S], past) -> (logits [B, S, V], present)``: the ONNX
Runtime decoder of an slmopt output folder (:meth:`Generator.from_engine`, ``decoder.onnx``) or a model
captured and given a KV cache in-process (:meth:`Generator.from_model`, runs in torch, for comparison).
The prompt is prefilled in one call (past length 0), then each new token is one decode call of length 1.

Sampling follows the usual order: logits / temperature, then top-k (keep the k largest, ties at the k-th
value kept), then top-p (keep the smallest set of most likely tokens whose probability reaches p), then one
draw from a ``torch.Generator`` seeded with ``seed`` — the same seed gives the same tokens.

Example:
    >>> # gen = Generator.from_engine("out/")
    >>> # for piece in gen.stream_text("def main(", max_new_tokens=32): print(piece, end="")
    >>> # gen.generate([5, 17, 42], 8, Sampling(do_sample=True, temperature=0.8, top_k=20, seed=1))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmopt.errors import UserError
from slmopt.generation.kv_cache import add_kv_cache, empty_past
from slmopt.loaders import load_program
from slmopt.lowering import folder_backend

__all__ = ["Generator", "Sampling", "TorchDecoder", "filter_logits", "sample_next", "special_tokens"]

log = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor, list[Any]], tuple[torch.Tensor, list[Any]]]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the default is greedy (argmax).

    Example:
        >>> Sampling().greedy, Sampling(do_sample=True, temperature=0.7, top_p=0.9).greedy
        (True, False)
    """

    do_sample: bool = field(default=False, metadata={"help": "sample instead of taking the argmax"})
    temperature: float = field(default=1.0, metadata={"help": "divides the logits before sampling (> 0)"})
    top_k: int = field(default=0, metadata={"help": "keep only the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "keep the smallest set reaching this probability"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling generator"})

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature-scaled logits ``[B, V]`` with tokens outside top-k / top-p set to ``-inf``.

    Example:
        >>> filter_logits(torch.tensor([[1.0, 3.0, 2.0]]), top_k=2)
        tensor([[-inf, 3., 2.]])
    """
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # A token is dropped when the tokens before it already reach top_p (so the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_next(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token ``[B]`` for the last-position logits ``[B, V]``."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scores = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TorchDecoder:
    """A step function over a KV-cache Program run in torch (see :func:`slmopt.generation.kv_cache.add_kv_cache`)."""

    backend = "torch"

    def __init__(self, program: Any, layout: Any) -> None:
        self.program, self.layout = program, layout

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return empty_past(self.layout, batch)

    def __call__(self, ids: torch.Tensor, past: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        with torch.no_grad():
            logits, *present = self.program.graph_module(ids, *past)
        return logits, present

    def describe(self) -> str:
        return f"torch decoder ({len(self.layout.slots)} cache slots)"


class Generator:
    """Greedy/sampled generation over a KV-cache step function, with a tokenizer when the model has one.

    Args:
        decoder: a backend's decoder (:meth:`slmopt.lowering.Backend.load_decoder`) or a
            :class:`TorchDecoder`: anything with ``empty_past(batch)`` and ``__call__(ids, past) -> (logits,
            present)``.
        tokenizer: a Hugging Face tokenizer, ``"bytes"`` for byte-level models, or None (ids only).
        eos_token_id: stop when every sequence has produced it (int or list of ints), if known.
        max_seq_len: the model's context; prompt + new tokens must fit.
    """

    def __init__(
        self,
        decoder: Any,
        tokenizer: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.max_seq_len = max_seq_len

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_engine(cls, folder: str | Path, threads: int | None = None) -> Generator:
        """Opens the KV-cache decoder of an slmopt output folder through its backend (onnxruntime:
        ``decoder.onnx``, ``genai_config.json``, ``slmopt_generation.json`` and the tokenizer files). EOS
        is the model's own (none: run to ``max_new_tokens``), not a placeholder ``genai_config.json`` may
        carry for onnxruntime-genai."""
        decoder = folder_backend(folder).load_decoder(Path(folder), threads=threads)
        ours = decoder.meta
        tokenizer: Any = "bytes" if ours.get("byte_level") else None
        if ours.get("tokenizer"):
            tokenizer = _load_tokenizer(Path(folder))
        eos = ours["special_tokens"]["eos_token_id"]
        return cls(decoder, tokenizer, eos, decoder.config["model"].get("context_length"))

    @classmethod
    def from_model(cls, model: Any) -> Generator:
        """Loads and captures a model (folder, .pt2, factory or module), adds a KV cache, runs it in torch."""
        program, loaded = load_program(model)
        cached, layout = add_kv_cache(program)
        info = loaded.info
        tokenizer: Any = "bytes" if info.byte_level else None
        if info.tokenizer_dir:
            tokenizer = _load_tokenizer(Path(info.tokenizer_dir))
        eos = special_tokens(info)["eos_token_id"]
        return cls(TorchDecoder(cached, layout), tokenizer, eos, info.max_seq_len)

    # ------------------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError("this engine has no tokenizer; give token ids instead (--input-ids 5,17,42)")
        if self.tokenizer == "bytes":
            return list(text.encode("utf-8"))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise UserError("this engine has no tokenizer to turn ids into text; use --print-ids")
        if self.tokenizer == "bytes":
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------------------ generation
    def _prompt(self, prompt: Any) -> torch.Tensor:
        ids = torch.as_tensor(prompt, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UserError("the prompt is empty: give at least one token")
        vocab = getattr(getattr(self.decoder, "layout", None), "vocab_size", None)
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise UserError(f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
        return ids

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.max_seq_len is not None and prompt_len + max_new_tokens > self.max_seq_len:
            raise UserError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {self.max_seq_len} tokens"
            )

    def stream(
        self, prompt: Any, max_new_tokens: int, sampling: Sampling | None = None, stop_at_eos: bool = True
    ) -> Iterator[torch.Tensor]:
        """Yields the next token ``[B]`` step by step (stops early once every sequence hit EOS).

        Args:
            prompt: token ids, ``[S]`` or ``[B, S]`` (a list or tensor).
            max_new_tokens: how many tokens to generate at most.
            sampling: greedy by default.
            stop_at_eos: finished rows repeat EOS and generation ends when all are finished; False
                generates exactly ``max_new_tokens`` whatever the tokens are.
        """
        sampling = sampling or Sampling()
        ids = self._prompt(prompt)
        self._check_length(int(ids.shape[1]), max_new_tokens)
        rng = torch.Generator().manual_seed(sampling.seed)
        logits, past = self.decoder(ids, self.decoder.empty_past(int(ids.shape[0])))
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for step in range(max_new_tokens):
            token = sample_next(logits[:, -1], sampling, rng)
            if stop_at_eos and self.eos.numel():
                token = torch.where(done, self.eos[0], token)  # finished rows repeat EOS (padding)
                done |= torch.isin(token, self.eos)
            yield token
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            logits, past = self.decoder(token[:, None], past)

    def generate(
        self, prompt: Any, max_new_tokens: int, sampling: Sampling | None = None, stop_at_eos: bool = True
    ) -> torch.Tensor:
        """Prompt plus generated tokens, ``[B, S + n]`` (see :meth:`stream`)."""
        ids = self._prompt(prompt)
        new = list(self.stream(ids, max_new_tokens, sampling, stop_at_eos))
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids

    def stream_text(
        self, prompt: str, max_new_tokens: int, sampling: Sampling | None = None
    ) -> Iterator[str]:
        """Yields decoded text pieces as they become complete characters (batch 1)."""
        if not prompt:
            raise UserError("the prompt is empty: give at least one character")
        ids: list[int] = []
        printed = ""
        for token in self.stream(self.encode(prompt), max_new_tokens, sampling):
            ids.append(int(token[0]))
            text = self.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                continue
            yield text[len(printed) :]
            printed = text
        text = self.decode(ids)
        if len(text) > len(printed):
            yield text[len(printed) :]


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def special_tokens(info: Any) -> dict[str, int | list[int] | None]:
    """The model's own BOS/EOS/PAD ids: from its config, else its ``generation_config.json``; None if neither.

    An id outside the vocabulary counts as none (the model can never emit it; random-init configs often
    keep a large default such as 50256 with a tiny vocabulary).

    Example:
        >>> from slmopt.program import ModelInfo
        >>> special_tokens(ModelInfo("causal-lm", "m", config={"eos_token_id": [2, 7], "bos_token_id": 1}))
        {'bos_token_id': 1, 'eos_token_id': [2, 7], 'pad_token_id': None}
    """
    config = dict(info.config or {})
    source = Path(info.source) / "generation_config.json" if info.source else None
    if source is not None and source.is_file():
        try:
            generation = json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            generation = {}
        for key, value in generation.items():
            if config.get(key) is None:
                config[key] = value
    vocab = info.vocab_size

    def valid(value: Any) -> int | None:
        token = _first_int(value)
        return token if token is not None and token >= 0 and (vocab is None or token < vocab) else None

    out: dict[str, int | list[int] | None] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        if isinstance(value, list):
            value = [valid(v) for v in value if valid(v) is not None] or None
        out[key] = value if isinstance(value, list) else valid(value)
    return out


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer in {folder}: {err}") from None
