"""The ``torch`` backend: a Program saved as a ``torch.export`` archive (``program.pt2``).

The archive keeps the dynamic batch/sequence dims of :meth:`slmopt.program.Program.export`, so the loaded
engine accepts any batch and sequence length inside the captured ranges. Custom ops (``slmopt::fff``) are
defined by ``slmopt.ops``; loading imports it first so the archive's calls resolve.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from slmopt.program import ModelInfo, capture
    >>> lin = torch.nn.Linear(4, 4)
    >>> info = ModelInfo(kind="module", source="demo", input_names=["x"], dynamic_dims=[{0: "batch"}])
    >>> prog = capture(lin, (torch.randn(2, 4),), info)
    >>> out = Path(tempfile.mkdtemp())
    >>> TorchBackend().lower(prog, out, {}).artifacts
    {'program': 'program.pt2'}
    >>> TorchBackend().load(out, threads=1)(torch.ones(3, 4)).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from slmopt.lowering import Backend, Engine, LoweringResult
from slmopt.program import unwrap_output

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = ["PROGRAM_FILE", "TorchBackend", "TorchEngine", "custom_ops_in", "import_custom_ops"]

log = logging.getLogger(__name__)

PROGRAM_FILE = "program.pt2"
# Namespaces of ops every torch install knows; anything else needs its library imported before load.
_BUILTIN_NAMESPACES = {"aten", "prims", "higher_order", "_operator", "builtins", "math"}


def import_custom_ops() -> bool:
    """Imports ``slmopt.ops`` (registers ``slmopt::*`` ops) if that module exists.

    Returns:
        True when the module was imported; False when it does not exist or failed to import (logged).
    """
    if importlib.util.find_spec("slmopt.ops") is None:
        return False
    try:
        importlib.import_module("slmopt.ops")
    except Exception as err:  # noqa: BLE001 - a broken op library must not hide archives that don't need it
        log.warning("could not import slmopt.ops (custom ops unavailable): %s", err)
        return False
    return True


def custom_ops_in(graph: torch.fx.Graph) -> list[str]:
    """Names of the non-builtin ops a graph calls (e.g. ``["slmopt::fff"]``), sorted."""
    names = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace not in _BUILTIN_NAMESPACES:
            names.add(node.target._schema.name)
    return sorted(names)


class TorchEngine(Engine):
    """Runs a graph module (loaded archive or a Program's module) under ``no_grad``.

    ``torch.set_num_threads`` is process-wide, so the engine re-applies its thread count before each call
    when someone else changed it (e.g. another engine in an interleaved benchmark).

    Args:
        module: the module to run; its output is unwrapped to one tensor.
        threads: intra-op threads for torch; None leaves torch's setting alone.
        source: a label for :meth:`describe`.
    """

    backend: ClassVar[str] = "torch"

    def __init__(self, module: nn.Module, threads: int | None = None, source: str = "") -> None:
        self.module = module
        self.threads = threads
        self.source = source
        if threads is not None:
            torch.set_num_threads(threads)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.no_grad():
            return unwrap_output(self.module(*inputs))

    def describe(self) -> str:
        threads = f", {self.threads} threads" if self.threads is not None else ""
        return f"torch ({self.source or 'module'}{threads})"


class TorchBackend(Backend):
    """Lowers a Program to ``program.pt2`` (``torch.export.save``) and loads it back."""

    name: ClassVar[str] = "torch"

    def lower(self, program: Program, out_dir: Path, options: dict[str, Any]) -> LoweringResult:
        """Re-exports the Program with its dynamic dims and saves the archive.

        Args:
            program: the (transformed) Program; it is not modified.
            out_dir: the folder to write ``program.pt2`` into.
            options: unused (accepted for a uniform backend interface); unknown keys are logged.

        Returns:
            ``artifacts={"program": "program.pt2"}`` and metadata (file size, node count, custom ops).
        """
        if options:
            log.info("torch backend ignores options %s", sorted(options))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        exported = program.export()
        path = out_dir / PROGRAM_FILE
        torch.export.save(exported, str(path))
        metadata = {
            "torch_version": torch.__version__,
            "file_size_bytes": path.stat().st_size,
            "num_nodes": len(exported.graph.nodes),
            "custom_ops": custom_ops_in(exported.graph),
            "seconds": round(time.perf_counter() - started, 3),
        }
        log.info("wrote %s (%.1f MB)", path, metadata["file_size_bytes"] / 1e6)
        return LoweringResult(backend=self.name, artifacts={"program": PROGRAM_FILE}, metadata=metadata)

    def load(self, out_dir: Path, threads: int | None = None, **options: Any) -> TorchEngine:
        """Loads ``program.pt2`` from ``out_dir`` as an engine.

        Args:
            out_dir: a folder written by :meth:`lower`.
            threads: ``torch.set_num_threads`` value; None keeps the current setting.
            **options: unused; unknown keys are logged.
        """
        if options:
            log.info("torch backend load ignores options %s", sorted(options))
        path = Path(out_dir) / PROGRAM_FILE
        if not path.is_file():
            raise ValueError(f"{out_dir} has no {PROGRAM_FILE}; was it lowered with the torch backend?")
        # Archives that call slmopt::* ops can only be deserialised once the ops are registered.
        import_custom_ops()
        from slmopt.safe_load import safe_export_load  # plain torch.export.load may unpickle arbitrary code

        exported = safe_export_load(path)
        return TorchEngine(exported.module(), threads=threads, source=str(path))
