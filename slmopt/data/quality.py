"""Data, quality and latency for one model: what ``compile``, ``eval`` and ``bench`` share.

Example:
    >>> # data = load_model_data(program.info, options)    # calibration + eval windows
    >>> # evaluate_quality(program, engine, data)          # {"before": {...}, "after": {...}}
    (Latency before/after is ``slmopt.bench.bench_model_vs_compiled``, shared with ``slmopt bench``.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slmopt.data.metrics import cross_entropy_nats, predicted_tokens, summarize_quality
from slmopt.data.samples import calibration_tokens, evaluation_data
from slmopt.data.windows import EvalData, load_tensor_inputs
from slmopt.errors import UserError
from slmopt.program import ModelInfo, Program

__all__ = [
    "ModelData",
    "evaluate_quality",
    "load_model_data",
    "load_tokenizer",
    "quality_of",
]

log = logging.getLogger(__name__)


@dataclass
class ModelData:
    """Calibration inputs and evaluation windows prepared for one model."""

    info: ModelInfo
    calib: torch.Tensor | None = None
    eval: EvalData | None = None
    tokenizer: Any = None
    notes: dict[str, str] = field(default_factory=dict)  # how each file became samples (for the report)

    def parity_inputs(self, program: Program) -> list[tuple[torch.Tensor, ...]]:
        """Two input sets of different shapes, to exercise the dynamic dims of an engine."""
        first = program.example_inputs
        if self.info.kind == "module":
            return [first, tuple(torch.cat([x, x[:1]]) for x in first)]
        if self.calib is not None:
            second = (self.calib[:1, : min(64, self.calib.shape[1])],)
        else:
            gen = torch.Generator().manual_seed(1)
            second = (torch.randint(0, self.info.vocab_size or 2, (1, 37), generator=gen),)
        return [first, second]


def load_tokenizer(info: ModelInfo) -> Any:
    if not info.tokenizer_dir:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(info.tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        log.warning("tokenizer in %s could not be loaded (%s); text data needs one", info.tokenizer_dir, err)
        return None


def _token_kwargs(info: ModelInfo, tokenizer: Any) -> dict[str, Any]:
    if info.kind != "module" and tokenizer is None and not info.byte_level:
        if info.vocab_size and info.vocab_size >= 256:
            log.warning("no tokenizer found: reading text files as raw bytes (ids 0-255)")
        return {"tokenizer": None, "byte_level": True, "vocab_size": info.vocab_size}
    return {"tokenizer": tokenizer, "byte_level": info.byte_level, "vocab_size": info.vocab_size}


def load_model_data(info: ModelInfo, options: Any) -> ModelData:
    """Reads ``options.calib`` and ``options.eval`` for the model (tokenizer, byte level or arrays).

    ``options.seq_len`` None (no ``--seq-len``): 2-D token-id arrays are used row by row as given, text
    and 1-D id streams are cut into windows of 256 tokens (see :mod:`slmopt.data.samples`); ``notes``
    says which happened.
    """
    tokenizer = load_tokenizer(info)
    data = ModelData(info=info, tokenizer=tokenizer)
    context = info.max_seq_len
    try:
        if options.calib and info.kind == "module":
            data.calib = load_tensor_inputs(options.calib, num_samples=options.num_samples)
            shape = "x".join(map(str, data.calib.shape[1:]))
            data.notes["calibration"] = f"{data.calib.shape[0]} input samples of shape [{shape}]"
        elif options.calib:
            data.calib, data.notes["calibration"] = calibration_tokens(
                options.calib,
                seq_len=options.seq_len,
                num_samples=options.num_samples,
                seed=options.seed,
                context=context,
                **_token_kwargs(info, tokenizer),
            )
        if options.eval:
            if info.kind != "causal-lm":
                raise UserError("--eval measures next-token quality and needs a causal language model")
            data.eval, data.notes["evaluation"] = evaluation_data(
                options.eval,
                seq_len=options.seq_len,
                max_windows=options.eval_samples,
                context=context,
                **_token_kwargs(info, tokenizer),
            )
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from None
    return data


def quality_of(logits_fn: Callable[[torch.Tensor], torch.Tensor], data: ModelData, progress: bool) -> dict:
    assert data.eval is not None
    nats = cross_entropy_nats(logits_fn, data.eval.tokens, progress=progress)
    return summarize_quality(
        nats, predicted_tokens(data.eval.tokens), data.eval.bytes_per_token, byte_level=data.info.byte_level
    )


def evaluate_quality(original: Program, engine: Callable, data: ModelData, progress: bool = True) -> dict:
    """Held-out quality of the original program and of the compiled engine (the artifact itself)."""
    before = quality_of(original, data, progress)
    after = quality_of(engine, data, progress)
    return {"before": before, "after": after, "eval_windows": int(data.eval.tokens.shape[0])}
