"""Model loaders: a Hugging Face model folder, a saved ``torch.export`` program, or ``module:factory``.

Every loader returns a :class:`LoadedModel` (a module that returns one tensor, example inputs and the
:class:`~slmopt.program.ModelInfo`), and never writes to the input. Pickled checkpoints are only ever read
with ``weights_only=True``.

Example:
    >>> # loaded = load_model("path/to/hf_model_dir")
    >>> # program = capture(loaded.module, loaded.example_inputs, loaded.info)
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmopt.data.windows import load_tensor_inputs
from slmopt.errors import UserError
from slmopt.program import ModelInfo, Program, capture
from slmopt.safe_load import (
    UNSAFE_PICKLE,
    check_loading_info,
    check_safetensors,
    check_shapes_before_loading,
    first_line,
    safe_export_load,
)

__all__ = ["HiddenOnly", "LoadedModel", "LogitsOnly", "load_model", "load_program", "model_files"]

log = logging.getLogger(__name__)

_EXAMPLE_SHAPE = (2, 16)  # >= 2 on every dynamic axis so export does not specialise them
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class LogitsOnly(nn.Module):
    """Wraps a Hugging Face causal LM so it maps ``input_ids`` to logits (no cache, no dict output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class HiddenOnly(nn.Module):
    """Wraps a Hugging Face encoder so it maps ``input_ids`` to the last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


@dataclass
class LoadedModel:
    module: nn.Module | None  # None once captured: the Program holds the weights
    example_inputs: tuple[torch.Tensor, ...]
    info: ModelInfo
    files: list[Path] = field(default_factory=list)  # input files read (for "never modified" checks)
    example_from_calib: bool = False  # example inputs are calibration samples (the source gave none)


def model_files(path: str | Path) -> list[Path]:
    """The files a model path consists of (a folder's regular files, or the file itself)."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return [p] if p.is_file() else []


def _token_inputs(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab_size, _EXAMPLE_SHAPE, generator=gen),)


# ------------------------------------------------------------------------------------ Hugging Face folder
def _is_causal_lm(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return bool(getattr(config, "is_decoder", False)) or config.model_type in {
        "llama",
        "qwen2",
        "gpt2",
        "mistral",
    }


def _load_hf_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    import transformers

    # slmopt draws its own progress bars; transformers' per-file "Loading weights" bars are noise here.
    transformers.utils.logging.disable_progress_bar()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{path} is not a model folder: no config.json "
            "(expected a Hugging Face model folder, a .pt2 file, or package.module:factory)"
        )
    try:
        json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is not valid JSON: {err}") from None
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if not weights and not pickles:
        raise UserError(f"{path} has a config.json but no weights (*.safetensors or pytorch_model.bin)")
    check_safetensors(weights)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers/huggingface_hub raise many types for bad configs
        raise UserError(
            f"{config_path}: not a configuration transformers can read: {first_line(err)}"
        ) from None
    causal = _is_causal_lm(config)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if weights:
        check_shapes_before_loading(path, config, auto, weights)
    verbosity = transformers.utils.logging.get_verbosity()
    try:
        # Our own check below replaces transformers' multi-line load report.
        transformers.utils.logging.set_verbosity_error()
        # transformers reads .bin checkpoints with torch.load(weights_only=True); safetensors preferred.
        model, loading = auto.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=bool(weights),
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by _check_loading_info with the names
        )
    except pickle.UnpicklingError:
        raise UserError(UNSAFE_PICKLE.format(path=pickles[0] if pickles else path)) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load the model in {path}: {first_line(err)}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    check_loading_info(path, loading)
    _own_weights(model)
    model.eval()
    vocab = int(config.vocab_size)
    has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
    info = ModelInfo(
        kind="causal-lm" if causal else "encoder",
        source=str(path),
        vocab_size=vocab,
        max_seq_len=context_length(config),
        byte_level=vocab == 256 and not has_tokenizer,
        tokenizer_dir=str(path) if has_tokenizer else None,
        config=config.to_dict(),
    )
    wrapper = LogitsOnly(model) if causal else HiddenOnly(model)
    return LoadedModel(wrapper, _token_inputs(vocab), info, model_files(path))


# Config keys families use for their context length (MPT: max_seq_len; GPT-2: n_positions; ...).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def context_length(config: Any) -> int | None:
    """The model's context length from its config, whichever key its family uses (None if absent)."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _own_weights(model: nn.Module) -> None:
    """Moves every parameter and buffer out of the checkpoint's file mapping into private memory.

    transformers leaves safetensors weights memory-mapped, and the mapping lives until the *last* tensor
    in it dies. Pages of weights a pass replaces (2:4 masks, FFF trees, pruned layers) would stay
    resident for the whole compile; with private copies they are freed as soon as they are dead. Tied
    weights stay tied (the shared Parameter object gets one new tensor). Costs one copy, tensor by
    tensor; the mapping is released when the last one is done.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


# ------------------------------------------------------------------------------------ torch.export file
_AXIS_NAMES = {0: "batch", 1: "seq"}


def _exported_dynamic_dims(
    ep: torch.export.ExportedProgram,
) -> tuple[list[dict[int, str]], dict[str, tuple[int, int]]]:
    """Which input axes the saved program keeps dynamic, and their (min, max) ranges.

    Re-capturing must not ask for more dynamism than the program was exported with (that violates its
    constraints), so the dims and their ranges come from the program's own symbolic input shapes.
    """
    user_inputs = set(ep.graph_signature.user_inputs)
    dims: list[dict[int, str]] = []
    bounds: dict[str, tuple[int, int]] = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        entry: dict[int, str] = {}
        for axis, size in enumerate(getattr(node.meta.get("val"), "shape", ())):
            if isinstance(size, torch.SymInt):
                name = entry[axis] = _AXIS_NAMES.get(axis, f"dim{axis}")
                rng = ep.range_constraints.get(size.node.expr)
                if rng is not None and rng.upper.is_finite:
                    bounds[name] = (int(rng.lower), int(rng.upper))
        dims.append(entry)
    return dims, bounds


def _load_pt2(path: Path) -> LoadedModel:
    ep = safe_export_load(path)
    args = ep.example_inputs[0] if ep.example_inputs else None
    if not args:
        raise UserError(f"{path} carries no example inputs; re-save it with torch.export.save")
    meta_file = path.with_suffix(".json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    first = args[0]
    token_model = not first.is_floating_point()
    kind = meta.get("kind") or ("causal-lm" if token_model else "module")
    dyn, bounds = _exported_dynamic_dims(ep)
    if any(0 not in dims for dims in dyn):
        raise UserError(
            f"{path} was exported with a static batch size; slmopt calibrates and verifies in batches, so "
            "export with a dynamic batch axis, e.g. dynamic_shapes={'input_ids': {0: Dim('batch'), 1: Dim('seq')}}"
        )
    info = ModelInfo(
        kind=kind,
        source=str(path),
        input_names=meta.get("input_names") or [f"input_{i}" if i else "input_ids" for i in range(len(args))],
        vocab_size=meta.get("vocab_size"),
        max_seq_len=meta.get("max_seq_len") or bounds.get("seq", (0, None))[1],
        byte_level=bool(meta.get("byte_level", False)),
        dynamic_dims=dyn,
        dim_bounds=bounds,
    )
    if not token_model:
        info.input_names = meta.get("input_names") or [f"input_{i}" for i in range(len(args))]
    return LoadedModel(ep.module(), tuple(args), info, [path])


# ------------------------------------------------------------------------------------ module:factory
def _load_factory(spec: str, calib: str | Path | None = None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"bad factory {spec!r}: expected package.module:function")
    # Like `python -m`, a factory in the current folder must be importable.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"cannot import {module_name!r} for factory {spec!r}: {err}") from None
    factory: Callable[[], Any] | None = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r}")
    made = factory()
    module, *rest = made if isinstance(made, tuple) else (made,)
    return from_module(module, *rest[:1], source=spec, calib=calib)


def _inputs_from_calib(calib: str | Path, source: str) -> tuple[torch.Tensor]:
    """Example inputs for a module without them: the first two samples of its calibration array."""
    try:
        x = load_tensor_inputs(calib, num_samples=2)
    except ValueError as err:
        raise UserError(f"{source}: example inputs from the calibration data: {err}") from None
    # Export specialises dims of size 1; two samples keep the leading axis dynamic.
    x = torch.cat([x, x]) if x.shape[0] < 2 else x
    log.info("%s: example inputs of shape %s taken from %s", source, list(x.shape), Path(calib).name)
    return (x,)


def _module_dims(x: torch.Tensor) -> dict[int, str]:
    """Dynamic axes of a module input that fit its rank.

    Token ids ``[batch, seq]`` and activations ``[batch, seq, hidden, ...]`` vary in their first two axes;
    a 2-D float input is ``[tokens, hidden]`` (or ``[batch, features]``), whose last axis is fixed by the
    weights, so only the leading axis varies (named "tokens": its bound is the sequence bound, not the batch
    bound); a 1-D input varies in its only axis.
    """
    if x.dim() >= 3 or (x.dim() == 2 and not x.is_floating_point()):
        return {0: "batch", 1: "seq"}
    if x.dim() == 2:
        return {0: "tokens"}
    return {0: "batch"} if x.dim() == 1 else {}


def from_module(
    module: nn.Module, example_inputs: Any = None, source: str = "<module>", calib: str | Path | None = None
) -> LoadedModel:
    """Wraps a Python module (a Hugging Face model, or any module plus example inputs).

    Args:
        module: the model.
        example_inputs: a tensor or tuple of tensors; None for a Hugging Face model (token ids are made
            up) or when ``calib`` is given (its first two samples are used).
        source: where the module came from, for messages and reports.
        calib: a ``.npy``/``.pt`` file of the module's inputs (``[samples, ...]``), used when
            ``example_inputs`` is None.

    Example:
        >>> # from_module(ffn_block, calib="ffn_inputs.npy").example_inputs[0].shape  -> [2, hidden]
    """
    if not isinstance(module, nn.Module):
        raise UserError(f"{source}: expected a torch.nn.Module, got {type(module).__name__}")
    config = getattr(module, "config", None)
    if example_inputs is None and config is not None and hasattr(config, "vocab_size"):
        causal = _is_causal_lm(config)
        info = ModelInfo(
            kind="causal-lm" if causal else "encoder",
            source=source,
            vocab_size=int(config.vocab_size),
            max_seq_len=context_length(config),
            config=config.to_dict(),
        )
        wrapper = LogitsOnly(module) if causal else HiddenOnly(module)
        return LoadedModel(wrapper, _token_inputs(info.vocab_size), info)
    from_calib = example_inputs is None and calib is not None and Path(calib).suffix in (".npy", ".pt")
    if from_calib:
        example_inputs = _inputs_from_calib(calib, source)
    if example_inputs is None:
        raise UserError(
            f"{source}: give example inputs for a module that is not a Hugging Face model (return "
            "(module, inputs) from the factory, or pass --calib with a .npy/.pt file of its inputs)"
        )
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    token_model = len(inputs) == 1 and not inputs[0].is_floating_point()
    info = ModelInfo(
        kind="causal-lm" if token_model else "module",
        source=source,
        input_names=["input_ids"] if token_model else [f"input_{i}" for i in range(len(inputs))],
        dynamic_dims=[_module_dims(x) for x in inputs],
    )
    return LoadedModel(module, inputs, info, example_from_calib=from_calib)


def load_model(
    spec: str | Path | nn.Module, dtype: torch.dtype = torch.float32, calib: str | Path | None = None
) -> LoadedModel:
    """Loads a model from a Hugging Face folder, a ``.pt2`` file, ``module:factory`` or a module.

    ``calib`` (a ``.npy``/``.pt`` of the model's inputs) supplies example inputs to a factory or module
    that has none.

    Raises:
        UserError: the path is missing, is not a model, or its files are corrupt.
    """
    if isinstance(spec, nn.Module):
        return from_module(spec, calib=calib)
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return _load_hf_dir(path, dtype)
        if path.suffix in (".pt2", ".ep"):
            return _load_pt2(path)
        raise UserError(f"{path}: unsupported model file (expected a folder, a .pt2 file or module:factory)")
    if ":" in text and not text.startswith(("/", ".")) and "/" not in text.split(":")[0]:
        return _load_factory(text, calib)
    raise UserError(f"model path {text} does not exist")


def load_program(
    spec: str | Path | nn.Module, calib: str | Path | None = None
) -> tuple[Program, LoadedModel]:
    """Loads and captures a model in one step (used by compile, inspect, eval and bench).

    ``calib``: see :func:`load_model`.
    """
    loaded = load_model(spec, calib=calib)
    try:
        # A module loaded from a path is private to this call: the Program may share its storage.
        private = not isinstance(spec, nn.Module)
        program = capture(loaded.module, loaded.example_inputs, loaded.info, copy_params=not private)
    except Exception as err:  # noqa: BLE001 - export failures have long messages; keep the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if loaded.info.kind == "module" and "Constraints violated" in str(err):
            shapes = ", ".join(str(list(x.shape)) for x in loaded.example_inputs)
            raise UserError(
                f"cannot capture {loaded.info.source}: example input(s) {shapes} with dynamic axes "
                f"{loaded.info.dynamic_dims}, but the model fixes one of them ({first}); slmopt expects "
                "[batch, seq, hidden, ...] (3-D or more), [tokens, hidden] (2-D) or [batch] (1-D) inputs"
            ) from err
        raise UserError(f"cannot capture {loaded.info.source} with torch.export: {first}") from err
    return program, loaded
