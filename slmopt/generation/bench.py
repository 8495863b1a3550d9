"""What users pay per token: prefill throughput, decode latency per token and KV-cache bytes, side by side.

:func:`bench_generation` compares the original model and a compiled output folder through the same
runtime: the original is captured, given a KV cache and lowered to ``decoder.onnx`` in a temporary folder,
the compiled folder's own ``decoder.onnx`` is opened, both with the same ``intra_op_num_threads`` and ORT
thread spinning off. Every measurement interleaves the two engines round-robin
(:func:`slmopt.bench.compare_latency`) and reports medians and the compiled/original ratio:

* prefill: one call on a prompt of L tokens with an empty cache (L = 128, 512, 2048 by default; lengths
  beyond the model's context are skipped with a note), as tokens per second;
* decode: one call of one new token per sequence against a cache of ``context`` positions, at batch 1 and
  8, as milliseconds per token step;
* KV bytes per token: what the cache grows by per generated token and sequence (2 x KV heads x head dim x
  dtype size, summed over the remaining attention layers).

:func:`bench_cache_vs_recompute` measures the point of a cache: one decode step with the cache vs running
``model.onnx`` on the whole context again.

Example:
    >>> # result = bench_generation("~/.cache/slmopt/tinylm", "out/", threads=1)
    >>> # print(result.table())
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmopt.bench import compare_latency
from slmopt.errors import UserError
from slmopt.loaders import load_program
from slmopt.lowering import Backend, folder_backend
from slmopt.program import Program

__all__ = ["GenerationBench", "bench_cache_vs_recompute", "bench_generation"]

log = logging.getLogger(__name__)

DEFAULT_PROMPT_LENGTHS = (128, 512, 2048)
DEFAULT_BATCHES = (1, 8)


@dataclass
class GenerationBench:
    """Rows of ``{metric, setting, <engine>_ms, ratio, ...}`` plus KV bytes per token and notes."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    kv_bytes_per_token: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "notes": self.notes,
            "config": self.config,
        }

    def table(self) -> str:
        """Aligned text: one line per measurement, medians of both engines and the ratio."""
        header = ("metric", "setting", "original", "compiled", "time ratio compiled/original")
        lines = [header]
        for r in self.rows:
            # A decode step yields one token per sequence: its latency is what each generated token costs.
            fmt = "{tokens_per_s:.0f} tok/s" if r["metric"] == "prefill" else "{ms_per_token:.2f} ms/step"
            lines.append((
                r["metric"], r["setting"], fmt.format(**r["original"]), fmt.format(**r["compiled"]),
                f"{r['ratio']:.3f}",
            ))  # fmt: skip
        kv = self.kv_bytes_per_token
        lines.append(("kv bytes/token", "per sequence", str(kv.get("original")), str(kv.get("compiled")),
                      f"{kv['compiled'] / kv['original']:.3f}" if kv.get("original") else "-"))  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
               for line in lines]  # fmt: skip
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(out + [f"note: {n}" for n in self.notes])


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def _original_decoder(original: Any, backend: Backend, tmp: Path, threads: int) -> Any:
    """The original model's decoder: an engine folder as it is; a model captured, cached and lowered by
    ``backend`` (the compiled folder's, so both decoders run in the same runtime)."""
    if isinstance(original, (str, Path)) and folder_backend(original).has_decoder(Path(original)):
        return folder_backend(original).load_decoder(Path(original), threads=threads, allow_spinning=False)
    if not isinstance(original, Program):
        original = load_program(original)[0]
    backend.lower_decoder(original, tmp, {})
    return backend.load_decoder(tmp, threads=threads, allow_spinning=False)


def bench_generation(
    original: Any,
    compiled_dir: str | Path,
    threads: int = 1,
    prompt_lengths: Sequence[int] = DEFAULT_PROMPT_LENGTHS,
    batches: Sequence[int] = DEFAULT_BATCHES,
    context: int = 128,
    reps: int = 10,
    warmup: int = 2,
    progress: bool = True,
) -> GenerationBench:
    """Prefill tokens/s, decode ms/token and KV bytes/token of the original model vs a compiled folder.

    Args:
        original: a model (path, Program, module) or an slmopt output folder with ``decoder.onnx``.
        compiled_dir: an slmopt output folder with ``decoder.onnx`` (onnxruntime backend, causal LM).
        threads: intra-op threads for both engines.
        prompt_lengths: prefill lengths; those beyond the context are skipped with a note.
        batches: decode batch sizes.
        context: cached positions during the decode measurement.
        reps / warmup: recorded and unrecorded rounds per measurement.
        progress: progress bars.

    Raises:
        UserError: the compiled folder has no decoder (not a causal LM, or generation was off).
    """
    torch.set_num_threads(threads)
    backend = folder_backend(compiled_dir)
    compiled = backend.load_decoder(Path(compiled_dir), threads=threads, allow_spinning=False)
    ctx = compiled.layout.max_seq_len or max(max(prompt_lengths, default=0), context + 1)
    vocab = int(compiled.layout.vocab_size or 2)
    if context + 1 > ctx:
        raise UserError(f"decode context {context} does not fit the model's context of {ctx} tokens")
    result = GenerationBench(config={"threads": threads, "reps": reps, "warmup": warmup, "decode_context": context,
                                     "runtime": "onnxruntime, allow_spinning=0, interleaved round-robin"})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="slmopt-genbench-") as tmp:
        orig = _original_decoder(original, backend, Path(tmp), threads)
        engines = {"original": orig, "compiled": compiled}
        result.kv_bytes_per_token = {n: e.layout.kv_bytes_per_token() for n, e in engines.items()}
        for length in prompt_lengths:
            if length > ctx:
                result.notes.append(f"prefill {length} skipped: beyond the model's context of {ctx}")
                continue
            ids = _ids(1, length, vocab)
            runners = {n: (lambda e=e, ids=ids: e(ids, e.empty_past(1))[0]) for n, e in engines.items()}
            timed = compare_latency(runners, (), warmup=warmup, reps=reps, progress=progress)
            result.rows.append(_row("prefill", f"prompt {length}", timed, tokens=length))
        for batch in batches:
            past = {
                n: e(_ids(batch, context, vocab, seed=1), e.empty_past(batch))[1] for n, e in engines.items()
            }
            step = _ids(batch, 1, vocab, seed=2)
            runners = {n: (lambda e=e, x=step, p=past[n]: e(x, p)[0]) for n, e in engines.items()}
            timed = compare_latency(runners, (), warmup=warmup, reps=reps, progress=progress)
            result.rows.append(_row("decode", f"batch {batch}, context {context}", timed, tokens=batch))
    return result


def _row(metric: str, setting: str, timed: Any, tokens: int) -> dict[str, Any]:
    row: dict[str, Any] = {"metric": metric, "setting": setting, "ratio": timed.ratio("compiled")}
    for name in ("original", "compiled"):
        ms = timed.median(name)
        row[name] = {"median_ms": ms, "tokens_per_s": tokens / ms * 1e3, "ms_per_token": ms}
    return row


def bench_cache_vs_recompute(
    folder: str | Path,
    context: int = 512,
    threads: int = 1,
    reps: int = 10,
    warmup: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """One new token at ``context`` cached positions: ``decoder.onnx`` step vs ``model.onnx`` on all of them.

    Both engines come from the same output folder and run in ONNX Runtime with the same threads; the
    result has both medians, the speedup of the cache and the max |diff| of the next-token logits.
    """
    backend = folder_backend(folder)
    decoder = backend.load_decoder(Path(folder), threads=threads, allow_spinning=False)
    full = backend.load(Path(folder), threads=threads, allow_spinning=False)
    ids = _ids(1, context + 1, int(decoder.layout.vocab_size or 2))
    _, past = decoder(ids[:, :context], decoder.empty_past(1))
    runners = {
        "recompute (model.onnx)": lambda: full(torch.from_numpy(ids))[:, -1],
        "kv cache (decoder.onnx)": lambda: decoder(ids[:, context:], past)[0][:, -1],
    }
    timed = compare_latency(runners, (), warmup=warmup, reps=reps, progress=progress)
    names = list(runners)
    return {
        "context": context,
        "threads": threads,
        "recompute_ms": timed.median(names[0]),
        "cached_ms": timed.median(names[1]),
        "speedup": timed.median(names[0]) / timed.median(names[1]),
        "max_abs_diff": timed.max_abs_diff[names[1]],
    }
