"""Backend registry and contract: lowering a Program to artifacts, and loading them back as an engine.

Backends are looked up lazily by name (``"module:Class"`` strings), so ``import slmopt`` needs neither
onnxruntime nor tensorrt. Every output folder carries ``slmopt.json`` (the manifest) naming its backend, so
``load_engine(folder)`` finds the right one.

Example:
    >>> sorted(BUILTIN_BACKENDS)
    ['onnxruntime', 'tensorrt', 'torch']
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from slmopt.errors import UserError

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = [
    "BUILTIN_BACKENDS",
    "DEFAULT_BACKEND",
    "MANIFEST",
    "Backend",
    "Decoder",
    "Engine",
    "LoweringResult",
    "folder_backend",
    "get_backend",
    "load_engine",
    "onnx_translations",
    "read_manifest",
    "register_onnx_translation",
]

MANIFEST = "slmopt.json"
DEFAULT_BACKEND = "onnxruntime"  # what `slmopt compile` lowers to unless told otherwise

BUILTIN_BACKENDS: dict[str, str] = {
    "torch": "slmopt.backends.torch_backend:TorchBackend",
    "onnxruntime": "slmopt.backends.onnxrt.backend:OnnxRuntimeBackend",
    "tensorrt": "slmopt.backends.tensorrt.builder:TensorRTBackend",
}
_BACKEND_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "pt2": "torch"}


@dataclass
class LoweringResult:
    """Artifacts (name → file name inside the output folder) and backend facts for the report."""

    backend: str
    artifacts: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """A loaded artifact that runs inputs to the model's output tensor (logits / hidden state)."""

    backend: ClassVar[str] = ""

    @abstractmethod
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str:
        return self.backend


class Backend(ABC):
    """Lowers a Program into ``out_dir`` and loads what it wrote."""

    name: ClassVar[str] = ""

    def check_available(self) -> None:  # noqa: B027 - optional hook, most backends always work
        """Raises ImportError/UserError naming what is missing (library, GPU) before any work starts."""

    @abstractmethod
    def lower(self, program: Program, out_dir: Path, options: dict[str, Any]) -> LoweringResult:
        """Writes artifacts into ``out_dir`` (a fresh temporary folder the caller renames into place)."""

    @abstractmethod
    def load(self, out_dir: Path, threads: int | None = None, **options: Any) -> Engine:
        """Loads the artifacts that :meth:`lower` wrote."""

    def check_artifacts(self, program: Program, out_dir: Path, artifacts: dict[str, str]) -> dict[str, Any]:
        """Reads the written artifacts back and checks what the passes promised in ``program.lowering_hints``
        (e.g. an N:M weight pattern). Returns ``report.checks`` entries; raises RuntimeError on a failure.
        """
        return {}

    def lower_decoder(self, program: Program, out_dir: Path, options: dict[str, Any]) -> dict[str, str]:
        """Writes an incremental (KV-cache) decoder of a causal LM into ``out_dir``; returns its artifacts."""
        raise UserError(f"the {self.name} backend cannot write a KV-cache decoder; use {DEFAULT_BACKEND}")

    def has_decoder(self, out_dir: Path) -> bool:
        """Whether ``out_dir`` holds a decoder :meth:`load_decoder` can open."""
        return False

    def load_decoder(self, out_dir: Path, threads: int | None = None, **options: Any) -> Decoder:
        """Opens the decoder that :meth:`lower` (or :meth:`lower_decoder`) wrote into ``out_dir``."""
        raise UserError(
            f"{out_dir} is a {self.name} engine without a KV-cache decoder: it is not a generation engine "
            f"(only causal LMs lowered with the {DEFAULT_BACKEND} backend and generation enabled have one)"
        )


class Decoder(Protocol):
    """An incremental decoder: ``(ids, past) -> (logits [B, S, V], present)``.

    ``layout`` describes the cache (``slmopt.generation.kv_cache.CacheLayout``), ``config`` the generation
    settings written next to it (a ``genai_config.json``-style dict with a ``"model"`` section) and
    ``meta`` slmopt's own description (``slmopt_generation.json``: slots, ``special_tokens``,
    ``tokenizer``, ``byte_level``).
    """

    backend: str
    layout: Any
    config: dict[str, Any]
    meta: dict[str, Any]

    def empty_past(self, batch: int) -> list[Any]: ...

    def __call__(self, ids: Any, past: list[Any]) -> tuple[torch.Tensor, list[Any]]: ...

    def describe(self) -> str: ...


def resolve_backend_name(name: str) -> str:
    canonical = _BACKEND_ALIASES.get(name, name)
    if canonical not in BUILTIN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(sorted(BUILTIN_BACKENDS))}")
    return canonical


def get_backend(name: str) -> Backend:
    """Instantiates a backend by name, importing its module on first use."""
    canonical = resolve_backend_name(name)
    module_name, cls_name = BUILTIN_BACKENDS[canonical].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{folder} is not an slmopt output folder (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def load_engine(folder: str | Path, threads: int | None = None, **options: Any) -> Engine:
    """Loads the engine of an slmopt output folder, whatever its backend."""
    manifest = read_manifest(folder)
    return get_backend(manifest["backend"]).load(Path(folder), threads=threads, **options)


def folder_backend(folder: str | Path) -> Backend:
    """The backend that wrote ``folder``: the manifest's, or the default backend for a folder that a
    backend's ``lower`` wrote directly (no ``slmopt.json``)."""
    if (Path(folder) / MANIFEST).is_file():
        return get_backend(read_manifest(folder)["backend"])
    return get_backend(DEFAULT_BACKEND)


# Custom-op translations for the ONNX exporter. Passes that emit custom ops (e.g. ``slmopt::fff``) register
# a *factory* per op: it receives the lowering hints (the Program's ``lowering_hints`` merged with the backend
# options) and returns the onnxscript function the exporter should use, so one op can lower several ways.
TranslationFactory = Callable[[dict[str, Any]], Callable[..., Any]]
_ONNX_TRANSLATIONS: dict[Any, TranslationFactory] = {}


def register_onnx_translation(op: Any, make: TranslationFactory) -> None:
    """Registers how ``op`` (an op overload such as ``torch.ops.slmopt.fff.default``) lowers to ONNX."""
    _ONNX_TRANSLATIONS[op] = make


def onnx_translations(hints: dict[str, Any] | None = None) -> dict[Any, Callable[..., Any]]:
    """The ``custom_translation_table`` for ``torch.onnx.export``, resolved for these hints."""
    return {op: make(dict(hints or {})) for op, make in _ONNX_TRANSLATIONS.items()}
