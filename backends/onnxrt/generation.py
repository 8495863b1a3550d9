"""Generation artifacts of the ``onnxruntime`` backend: ``decoder.onnx`` with an explicit KV cache.

:func:`lower_generation` adds the KV cache to the final Program (:func:`slmopt.generation.kv_cache.add_kv_cache`),
exports it with named inputs ``input_ids, past_key_values.{i}.key/value`` and outputs ``logits,
present.{i}.key/value`` (dynamic batch, sequence and past length; past length 0 is prefill), checks in ONNX
Runtime that prefill + one decode step reproduce the Program's full forward, copies the model's tokenizer
into ``tokenizer/`` and writes ``genai_config.json`` (an onnxruntime-genai-style description: layers, heads,
KV heads, head size, cache layout, dtype, vocabulary, context, special tokens, tokenizer, and which original
block each cache slot belongs to). :class:`OnnxDecoder` runs the result step by step.

Example:
    >>> # artifacts, meta = lower_generation(program, Path("out"), opset=18)
    >>> # artifacts == {"decoder": "decoder.onnx", "genai_config": "genai_config.json"}
    >>> # decoder = OnnxDecoder(Path("out")); logits, present = decoder(ids, decoder.empty_past(1))
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slmopt.backends.onnxrt.export import export_onnx
from slmopt.backends.onnxrt.session import make_session
from slmopt.errors import UserError
from slmopt.generation.kv_cache import CacheLayout, CacheSlot, add_kv_cache, empty_past

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = [
    "DECODER_FILE",
    "GENAI_CONFIG",
    "OnnxDecoder",
    "genai_config",
    "lower_generation",
    "maybe_lower_generation",
    "read_genai_config",
]

log = logging.getLogger(__name__)

DECODER_FILE = "decoder.onnx"
GENAI_CONFIG = "genai_config.json"
TOKENIZER_DIR = "tokenizer"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
CHECK_TOLERANCE = 1e-4  # relative to max(1, max |logits|): ORT and torch differ by float rounding only


def _special(config: dict[str, Any], key: str) -> int | list[int] | None:
    value = config.get(key)
    return value if isinstance(value, (int, list)) else None


def genai_config(info: Any, layout: CacheLayout, tokenizer: str | None) -> dict[str, Any]:
    """The ``genai_config.json`` content for a decoder with this cache layout.

    Example:
        >>> # genai_config(program.info, layout, "tokenizer")["model"]["decoder"]["num_key_value_heads"]
    """
    config = info.config or {}
    first = layout.slots[0]
    return {
        "model": {
            "type": config.get("model_type", "unknown"),
            "context_length": info.max_seq_len,
            "vocab_size": info.vocab_size,
            "bos_token_id": _special(config, "bos_token_id"),
            "eos_token_id": _special(config, "eos_token_id"),
            "pad_token_id": _special(config, "pad_token_id"),
            "decoder": {
                "filename": DECODER_FILE,
                "num_hidden_layers": len(layout.slots),
                "num_attention_heads": first.num_heads,
                "num_key_value_heads": first.num_kv_heads,
                "head_size": first.head_dim,
                "hidden_size": config.get("hidden_size") or config.get("n_embd"),
                "inputs": {
                    "input_ids": "input_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {"max_length": info.max_seq_len, "do_sample": False},
        "slmopt": {
            "cache_layout": layout.layout,
            "dtype": layout.dtype,
            "kv_bytes_per_token": layout.kv_bytes_per_token(),
            "num_blocks": layout.num_blocks,
            "slots": [
                {
                    "index": s.index,
                    "block": s.block,
                    "num_heads": s.num_heads,
                    "num_kv_heads": s.num_kv_heads,
                    "head_dim": s.head_dim,
                }
                for s in layout.slots
            ],
            "tokenizer": tokenizer,
            "byte_level": bool(info.byte_level),
            "input_names": layout.input_names(),
            "output_names": layout.output_names(),
        },
    }


def read_genai_config(folder: str | Path) -> tuple[dict[str, Any], CacheLayout]:
    """Reads ``genai_config.json`` of an engine folder back into its dict and :class:`CacheLayout`."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise UserError(
            f"{folder} has no {GENAI_CONFIG}: it is not a generation engine (only causal LMs lowered with "
            "the onnxruntime backend and generation enabled have one)"
        )
    config = json.loads(path.read_text())
    ours = config["slmopt"]
    layout = CacheLayout(
        slots=[CacheSlot(node="", **s) for s in ours["slots"]],
        dtype=ours["dtype"],
        vocab_size=config["model"]["vocab_size"],
        max_seq_len=config["model"]["context_length"],
        num_blocks=ours.get("num_blocks", 0),
        layout=ours["cache_layout"],
    )
    return config, layout


def _copy_tokenizer(info: Any, out_dir: Path) -> str | None:
    """Copies the model's tokenizer files into ``out_dir/tokenizer``; returns that folder's name or None."""
    src = Path(info.tokenizer_dir) if info.tokenizer_dir else None
    files = [src / name for name in _TOKENIZER_FILES if src is not None and (src / name).is_file()]
    if not files:
        return None
    (out_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
    for f in files:
        shutil.copy2(f, out_dir / TOKENIZER_DIR / f.name)
    return TOKENIZER_DIR


class OnnxDecoder:
    """One ONNX Runtime session over ``decoder.onnx``: ``(ids, past) -> (logits, present)``.

    Past/present K/V stay numpy arrays between steps (no copies through torch); logits come back as a
    torch tensor ``[B, S, V]``.
    """

    backend = "onnxruntime"

    def __init__(self, folder: str | Path, threads: int | None = None, allow_spinning: bool = True) -> None:
        self.folder = Path(folder)
        self.config, self.layout = read_genai_config(self.folder)
        path = self.folder / self.config["model"]["decoder"]["filename"]
        if not path.is_file():
            raise UserError(f"{self.folder} has {GENAI_CONFIG} but no {path.name}")
        self.session = make_session(path, threads=threads, allow_spinning=allow_spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtype = np.dtype(self.layout.dtype)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [t.numpy().astype(self._dtype) for t in empty_past(self.layout, batch)]

    def __call__(self, ids: torch.Tensor | np.ndarray, past: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        ids_np = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        feeds = {"input_ids": ids_np.astype(np.int64, copy=False)}
        for name, value in zip(self.input_names[1:], past, strict=True):
            feeds[name] = value.numpy() if isinstance(value, torch.Tensor) else value
        logits, *present = self.session.run(self.output_names, feeds)
        return torch.from_numpy(logits), present

    def describe(self) -> str:
        return f"onnxruntime decoder ({len(self.layout.slots)} cache slots)"


def _check_decoder(program: Program, folder: Path) -> float:
    """ORT prefill of S−1 tokens then one decode step vs the Program's full forward on S tokens."""
    ids = program.example_inputs[0]
    seq = int(ids.shape[1])
    expected = program(ids).float()
    decoder = OnnxDecoder(folder)
    prefill, present = decoder(ids[:, : seq - 1], decoder.empty_past(int(ids.shape[0])))
    step, _ = decoder(ids[:, seq - 1 :], present)
    got = torch.cat([prefill, step], dim=1).float()
    diff = float((got - expected).abs().max())
    limit = CHECK_TOLERANCE * max(1.0, float(expected.abs().max()))
    if not diff <= limit:
        raise RuntimeError(
            f"{DECODER_FILE}: prefill+decode in ONNX Runtime differs from the Program by {diff:.3g} (> {limit:.3g})"
        )
    return diff


def lower_generation(
    program: Program,
    out_dir: Path,
    *,
    opset: int,
    optimize: bool = True,
    external_data: bool | None = None,
    hints: dict[str, Any] | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Writes ``decoder.onnx`` (+ data), ``genai_config.json`` and ``tokenizer/`` into ``out_dir``.

    Returns:
        ``(artifacts, metadata)``: artifact names → file names, and the cache layout, export facts and the
        ORT prefill+decode check.

    Raises:
        UserError: the model cannot get a KV cache (see :func:`slmopt.generation.kv_cache.add_kv_cache`).
    """
    cached, layout = add_kv_cache(program)
    path = Path(out_dir) / DECODER_FILE
    export = export_onnx(
        cached,
        path,
        opset=opset,
        external_data=external_data,
        optimize=optimize,
        hints=hints,
        output_names=layout.output_names(),
    )
    artifacts = {"decoder": DECODER_FILE, "genai_config": GENAI_CONFIG}
    if export["external_data"]:
        artifacts["decoder_data"] = DECODER_FILE + ".data"
    tokenizer = _copy_tokenizer(program.info, Path(out_dir))
    config = genai_config(program.info, layout, tokenizer)
    (Path(out_dir) / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer:
        artifacts["tokenizer"] = tokenizer
    diff = _check_decoder(program, Path(out_dir))
    metadata = {
        "cache": layout.to_dict(),
        "prefill_decode_max_abs_diff": diff,
        "export_seconds": export["export_seconds"],
        "file_size_bytes": export["file_size_bytes"],
        "input_names": export["input_names"],
        "output_names": export["output_names"],
    }
    return artifacts, metadata


def maybe_lower_generation(
    program: Program, out_dir: Path, opts: dict[str, Any], hints: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]] | None:
    """The ``generation`` option of the onnxruntime backend; None when no decoder is wanted.

    ``opts["generation"]`` None (default) writes the decoder for causal LMs and, when the model cannot get
    a KV cache, records why under ``{"skipped": ...}`` instead of failing the whole lowering; True makes
    that an error; False skips it.
    """
    wanted = opts["generation"]
    if wanted is False or (wanted is None and program.info.kind != "causal-lm"):
        return None
    if program.info.kind != "causal-lm":
        raise UserError(f"generation=true needs a causal LM; this model is {program.info.kind!r}")
    try:
        return lower_generation(
            program,
            out_dir,
            opset=opts["opset"],
            optimize=opts["optimize"],
            external_data=opts["external_data"],
            hints=hints,
        )
    except UserError as err:
        if wanted:
            raise
        # The default must not make compiling a model fail that merely cannot decode incrementally.
        log.warning("no generation decoder written: %s", err)
        return {}, {"skipped": str(err)}
