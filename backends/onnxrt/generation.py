"""Generation artifacts of the ``onnxruntime`` backend: ``decoder.onnx`` with an explicit KV cache.

:func:`lower_generation` adds the KV cache to the final Program (:func:`slmopt.generation.kv_cache.add_kv_cache`),
exports it with named inputs ``input_ids, past_key_values.{i}.key/value`` and outputs ``logits,
present.{i}.key/value`` (dynamic batch, sequence and past length; past length 0 is prefill) and checks in
ONNX Runtime that prefill, a chunk and a decode step reproduce the Program's full forward (past any sliding
window). Beside it go:

* ``genai_config.json``, for the ONNX Runtime GenAI client (``onnxruntime-genai``), holding only keys that
  client knows: its 0.18 parser rejects unknown keys and ``null`` special-token ids, and its
  ``"decoder"`` model type is the generic decoder-only model (family names such as ``gpt2`` select
  family-specific input layouts that this decoder does not have). A model without a BOS/EOS/PAD id gets
  a placeholder the client accepts (recorded in ``slmopt_generation.json`` and logged);
* the model's tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...), in the same folder,
  where the client looks for them;
* ``slmopt_generation.json``, slmopt's own description: cache layout and dtype, KV bytes per token, each
  slot's original block, head counts and sliding window, the model's own special tokens, tokenizer, and
  the input/output names.

:class:`OnnxDecoder` runs the result step by step.

Example:
    >>> # artifacts, meta = lower_generation(program, Path("out"), opset=18)
    >>> # artifacts["genai_config"], artifacts["generation_meta"]
    >>> # ('genai_config.json', 'slmopt_generation.json')
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
from slmopt.generation.generate import special_tokens
from slmopt.generation.kv_cache import (
    CacheLayout,
    CacheSlot,
    add_kv_cache,
    check_ids,
    empty_past,
    run_in_steps,
)

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = [
    "DECODER_FILE",
    "GENAI_CONFIG",
    "GENERATION_META",
    "OnnxDecoder",
    "genai_config",
    "generation_meta",
    "lower_generation",
    "maybe_lower_generation",
    "read_genai_config",
]

log = logging.getLogger(__name__)

DECODER_FILE = "decoder.onnx"
GENAI_CONFIG = "genai_config.json"
GENERATION_META = "slmopt_generation.json"
# onnxruntime-genai's generic decoder-only model; family names select other input layouts (gpt2: "past_%d").
GENAI_MODEL_TYPE = "decoder"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
CHECK_TOLERANCE = 1e-4  # relative to max(1, max |logits|): ORT and torch differ by float rounding only


def _genai_special(specials: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Numeric BOS/EOS/PAD for genai (it rejects null); returns them and which ones are placeholders.

    A missing PAD takes the EOS id (HF ``generate``'s convention), a missing BOS the PAD/EOS id; with no id
    at all, token 0 stands in: the client then stops if the model emits token 0, ``slmopt generate`` does not.
    """
    eos = specials["eos_token_id"]
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = specials["pad_token_id"] if specials["pad_token_id"] is not None else first_eos
    bos = specials["bos_token_id"] if specials["bos_token_id"] is not None else pad
    values = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    placeholders = {k: 0 for k, v in values.items() if v is None}
    return values | placeholders, placeholders


def genai_config(info: Any, layout: CacheLayout) -> dict[str, Any]:
    """The ``genai_config.json`` content for a decoder with this cache layout (onnxruntime-genai schema).

    Example:
        >>> # genai_config(program.info, layout)["model"]["decoder"]["num_key_value_heads"]
    """
    config = info.config or {}
    first = layout.slots[0]
    special, _ = _genai_special(special_tokens(info))
    # The client rejects null; without a known context the cache's own bound (see add_kv_cache) stands in.
    context = info.max_seq_len or 1 << 16
    decoder = {
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
    }
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "context_length": context,
            "vocab_size": info.vocab_size,
            **special,
            "decoder": {k: v for k, v in decoder.items() if v is not None},
        },
        "search": {"max_length": context, "do_sample": False},
    }


def genai_incompatibility(layout: CacheLayout) -> str | None:
    """Why onnxruntime-genai cannot run this decoder, or None.

    The client sizes every layer's cache from one ``num_key_value_heads``/``head_size``; a decoder whose
    layers differ (elastic subnets slice heads per layer) still runs in ``slmopt generate``.
    """
    shapes = sorted({(s.num_kv_heads, s.head_dim) for s in layout.slots})
    if len(shapes) > 1:
        return f"its layers have different KV heads x head size {shapes}; the client assumes one for all"
    return None


def generation_meta(info: Any, layout: CacheLayout, tokenizer: bool) -> dict[str, Any]:
    """slmopt's own ``slmopt_generation.json``: what the GenAI schema has no keys for.

    Example:
        >>> # generation_meta(program.info, layout, tokenizer=True)["slots"][0]["window"]
    """
    specials = special_tokens(info)
    return {
        "model_type": (info.config or {}).get("model_type"),
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
                "window": s.window,
            }
            for s in layout.slots
        ],
        "special_tokens": specials,
        "genai_placeholders": _genai_special(specials)[1],
        "genai_incompatible": genai_incompatibility(layout),
        "tokenizer": tokenizer,
        "byte_level": bool(info.byte_level),
        "input_names": layout.input_names(),
        "output_names": layout.output_names(),
    }


def read_genai_config(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], CacheLayout]:
    """Reads an engine folder's ``genai_config.json`` and ``slmopt_generation.json``; returns both and the
    :class:`CacheLayout`.

    Raises:
        UserError: the folder is not a generation engine, or was written by an older slmopt.
    """
    folder = Path(folder)
    path = folder / GENAI_CONFIG
    if not path.is_file():
        raise UserError(
            f"{folder} has no {GENAI_CONFIG}: it is not a generation engine (only causal LMs lowered with "
            "the onnxruntime backend and generation enabled have one)"
        )
    config = json.loads(path.read_text())
    meta_path = folder / GENERATION_META
    if not meta_path.is_file():
        raise UserError(
            f"{folder} has {GENAI_CONFIG} but no {GENERATION_META} (written by an older slmopt?); "
            "compile the model again"
        )
    ours = json.loads(meta_path.read_text())
    layout = CacheLayout(
        slots=[CacheSlot(node="", **s) for s in ours["slots"]],
        dtype=ours["dtype"],
        vocab_size=config["model"]["vocab_size"],
        max_seq_len=config["model"]["context_length"],
        num_blocks=ours.get("num_blocks", 0),
        layout=ours["cache_layout"],
    )
    return config, ours, layout


def _copy_tokenizer(info: Any, out_dir: Path) -> list[str]:
    """Copies the model's tokenizer files next to ``genai_config.json``; returns their names."""
    src = Path(info.tokenizer_dir) if info.tokenizer_dir else None
    files = [src / name for name in _TOKENIZER_FILES if src is not None and (src / name).is_file()]
    for f in files:
        shutil.copy2(f, out_dir / f.name)
    return [f.name for f in files]


class OnnxDecoder:
    """One ONNX Runtime session over ``decoder.onnx``: ``(ids, past) -> (logits, present)``.

    Past/present K/V stay numpy arrays between steps (no copies through torch); logits come back as a
    torch tensor ``[B, S, V]``.
    """

    backend = "onnxruntime"

    def __init__(self, folder: str | Path, threads: int | None = None, allow_spinning: bool = True) -> None:
        self.folder = Path(folder)
        self.config, self.meta, self.layout = read_genai_config(self.folder)
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


def _check_decoder(program: Program, folder: Path, layout: CacheLayout) -> float:
    """ORT prefill, chunk and decode vs the Program's full forward, on ids longer than any window."""
    ids = check_ids(program, layout)
    expected = program(ids).float()
    decoder = OnnxDecoder(folder)
    got = run_in_steps(decoder, ids, decoder.empty_past(int(ids.shape[0])))
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
    """Writes ``decoder.onnx`` (+ data), ``genai_config.json``, ``slmopt_generation.json`` and the
    tokenizer files into ``out_dir``.

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
    artifacts = {"decoder": DECODER_FILE, "genai_config": GENAI_CONFIG, "generation_meta": GENERATION_META}
    if export["external_data"]:
        artifacts["decoder_data"] = DECODER_FILE + ".data"
    tokenizer = _copy_tokenizer(program.info, Path(out_dir))
    (Path(out_dir) / GENAI_CONFIG).write_text(json.dumps(genai_config(program.info, layout), indent=2) + "\n")
    meta = generation_meta(program.info, layout, tokenizer=bool(tokenizer))
    (Path(out_dir) / GENERATION_META).write_text(json.dumps(meta, indent=2) + "\n")
    if meta["genai_incompatible"]:
        log.warning("%s is written, but onnxruntime-genai cannot run this decoder: %s", GENAI_CONFIG,
                    meta["genai_incompatible"])  # fmt: skip
    if meta["genai_placeholders"]:
        log.warning(
            "the model defines no %s; %s names token 0 instead because onnxruntime-genai requires a number "
            "(that client stops if the model emits it; slmopt generate does not)",
            "/".join(k.removesuffix("_token_id").upper() for k in meta["genai_placeholders"]),
            GENAI_CONFIG,
        )
    artifacts.update({name.replace(".", "_"): name for name in tokenizer})  # tokenizer_json: ...
    diff = _check_decoder(program, Path(out_dir), layout)
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
