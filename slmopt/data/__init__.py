"""Calibration and evaluation data: token windows, the layer-by-layer graph runner, quality metrics.

Modules: ``windows`` (reading text/token files into windows), ``runner`` (streaming calibration
activations through a Program), ``quality`` (perplexity/bits-per-byte evaluation of a model) and
``metrics`` (the formulas).

Example:
    >>> from slmopt.data import cross_entropy_nats
    >>> # nats = cross_entropy_nats(logits_fn, eval_windows(tokens, 256))
"""

from __future__ import annotations

from slmopt.data.metrics import bits_per_byte, cross_entropy_nats, perplexity, summarize_quality
from slmopt.data.quality import ModelData, evaluate_quality, load_model_data, quality_of
from slmopt.data.runner import CALIB_BATCH, GraphRunner, calib_batches, stream_activations
from slmopt.data.windows import DataSpec, EvalData, eval_windows, load_tensor_inputs, load_tokens

__all__ = [
    "CALIB_BATCH",
    "DataSpec",
    "EvalData",
    "GraphRunner",
    "ModelData",
    "bits_per_byte",
    "calib_batches",
    "cross_entropy_nats",
    "eval_windows",
    "evaluate_quality",
    "load_model_data",
    "load_tensor_inputs",
    "load_tokens",
    "perplexity",
    "quality_of",
    "stream_activations",
    "summarize_quality",
]
