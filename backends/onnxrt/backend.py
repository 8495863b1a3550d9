"""The ``onnxruntime`` backend: a Program exported to ONNX (``model.onnx``) and run in ONNX Runtime.

Lowering exports the Program (:mod:`slmopt.backends.onnxrt.export`: dynamic dims, custom-op translations,
an IR version ONNX Runtime 1.31 loads, ``onnx.checker``; the verified exporter facts are listed there),
optionally runs it once against the Program, and writes the KV-cache decoder of a causal LM
(:mod:`slmopt.backends.onnxrt.generation`). Sessions and the Engine are in
:mod:`slmopt.backends.onnxrt.session`; the N:M check of the written file in :mod:`slmopt.backends.onnxrt.check`.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from slmopt.program import ModelInfo, capture
    >>> lin = torch.nn.Linear(4, 4)
    >>> info = ModelInfo(kind="module", source="demo", input_names=["x"], dynamic_dims=[{0: "batch"}])
    >>> out = Path(tempfile.mkdtemp())
    >>> result = OnnxRuntimeBackend().lower(capture(lin, (torch.randn(2, 4),), info), out, {})
    >>> result.artifacts
    {'onnx': 'model.onnx'}
    >>> OnnxRuntimeBackend().load(out, threads=1)(torch.ones(3, 4)).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from slmopt.backends.onnxrt.check import check_nm_onnx
from slmopt.backends.onnxrt.export import (
    DEFAULT_OPSET,
    MAX_IR_VERSION,
    ONNX_DATA_FILE,
    ONNX_FILE,
    export_onnx,
    onnx_op_histogram,
)
from slmopt.backends.onnxrt.generation import (
    GENAI_CONFIG,
    OnnxDecoder,
    lower_generation,
    maybe_lower_generation,
)
from slmopt.backends.onnxrt.session import OnnxRuntimeEngine, make_session, run_onnx
from slmopt.lowering import Backend, LoweringResult
from slmopt.sparsity import NM_HINT

if TYPE_CHECKING:
    from slmopt.program import Program

# The export and session names are re-exported: ``backend`` is where users look for the onnxruntime API.
__all__ = [
    "DEFAULT_OPSET",
    "MAX_IR_VERSION",
    "ONNX_DATA_FILE",
    "ONNX_FILE",
    "OnnxRuntimeBackend",
    "OnnxRuntimeEngine",
    "export_onnx",
    "make_session",
    "nm_artifact_checks",
    "onnx_op_histogram",
    "run_onnx",
]

log = logging.getLogger(__name__)

_OPTIONS = {"opset", "external_data", "optimize", "verify", "generation"}
# Hints for custom-op lowerings (see slmopt.backends.onnxrt.fff); they override the Program's own hints.
_HINTS = {"fff_lowering", "fff_routing", "fff_moe_exact"}


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _OPTIONS - _HINTS
    if unknown:
        valid = ", ".join(sorted(_OPTIONS | _HINTS))
        raise ValueError(f"unknown onnxruntime backend option(s) {sorted(unknown)}; valid options: {valid}")
    opset = int(options.get("opset", DEFAULT_OPSET))
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (the exporter's native opset), got {opset}")
    external, verify = options.get("external_data"), options.get("verify")
    return {
        "opset": opset,
        "external_data": None if external is None else bool(external),
        "optimize": bool(options.get("optimize", True)),
        "verify": None if verify is None else bool(verify),
        "generation": None if options.get("generation") is None else bool(options["generation"]),
    }


def _verify(program: Program, path: Path) -> float:
    """Runs the file once in ORT on the example inputs; returns max |ORT − Program|.

    Catches exporter/optimizer output that validates but does not run (e.g. the opset-23 rotary fusion).
    """
    expected = program(*program.example_inputs).float()
    try:
        got = run_onnx(path, program.example_inputs, threads=None).float()
    except Exception as err:
        raise RuntimeError(
            f"the exported ONNX model does not run in ONNX Runtime on the example inputs ({err}); "
            f"try another opset (18-22 are known to work) or optimize=false"
        ) from err
    if got.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {tuple(got.shape)} != Program's {tuple(expected.shape)}")
    diff = (got - expected).abs()
    if not torch.isfinite(got).all() and torch.isfinite(expected).all():
        raise RuntimeError("the exported ONNX model produces non-finite outputs where the Program does not")
    return float(diff.max()) if diff.numel() else 0.0


def nm_artifact_checks(program: Program, folder: Path, artifacts: dict[str, str]) -> dict[str, Any]:
    """``report.checks`` entry for the N:M pattern promised in ``program.lowering_hints[NM_HINT]``.

    The weights still in the Program are checked in the written ``onnx`` artifact (a later pass may have
    replaced masked weights: fff swaps the FFN linears for a tree). Raises RuntimeError when one fails.
    """
    hint, onnx_file = program.lowering_hints.get(NM_HINT), artifacts.get("onnx")
    if not hint or not onnx_file:
        return {}
    n, m = hint["n"], hint["m"]
    present = set(program.graph_module.state_dict())
    names = [w for w in hint["weights"] if w in present]
    result = check_nm_onnx(folder / onnx_file, n=n, m=m, names=names)
    expected = [r for r in result.rows if r.expected]
    if not result.passed(names):
        raise RuntimeError(f"the saved ONNX does not hold the {n}:{m} pattern:\n{result.table()}")
    return {
        f"onnx_{n}to{m}": {
            "passed": True,
            "weights_checked": len(expected),
            "weights_masked": len(names),
            "min_valid_fraction": min((r.valid_fraction or 0.0 for r in expected), default=None),
            "negative_zeros": sum(r.negative_zeros for r in expected),
        }
    }


class OnnxRuntimeBackend(Backend):
    """Lowers a Program to ``model.onnx`` (+ ``model.onnx.data``) and loads it in ONNX Runtime."""

    name: ClassVar[str] = "onnxruntime"

    def lower(self, program: Program, out_dir: Path, options: dict[str, Any]) -> LoweringResult:
        """Exports, validates and (by default) runs the ONNX model once.

        Args:
            program: the Program to lower (not modified).
            out_dir: the folder to write into.
            options: ``opset`` (int, default 18), ``external_data`` (bool; default: by size),
                ``optimize`` (bool, default True), ``verify`` (bool, default False: run once in ORT on
                the example inputs and record ``max_abs_diff`` vs the Program; ``slmopt.compile`` does
                not need it, as it checks parity on the loaded engine at two shapes itself),
                ``generation`` (bool; default: on for causal LMs, skipped with a warning when the model
                cannot get a KV cache; ``true`` makes that an error): also write ``decoder.onnx`` with an
                explicit KV cache, ``genai_config.json`` (onnxruntime-genai), ``slmopt_generation.json``
                and the tokenizer files (see :mod:`slmopt.backends.onnxrt.generation`).

        Returns:
            ``artifacts`` ``{"onnx": "model.onnx"}`` (+ ``"onnx_data"``) and the export metadata.

        Example:
            >>> # OnnxRuntimeBackend().lower(program, Path("out"), {"external_data": True}).artifacts
            >>> # {'onnx': 'model.onnx', 'onnx_data': 'model.onnx.data'}
        """
        opts = _options(options)
        out_dir = Path(out_dir)
        path = out_dir / ONNX_FILE
        metadata = export_onnx(
            program,
            path,
            opset=opts["opset"],
            external_data=opts["external_data"],
            optimize=opts["optimize"],
            hints={k: v for k, v in options.items() if k in _HINTS},
        )
        artifacts = {"onnx": ONNX_FILE}
        if metadata["external_data"]:
            artifacts["onnx_data"] = ONNX_DATA_FILE
        if opts["verify"]:
            metadata["max_abs_diff"] = _verify(program, path)
            log.info("ONNX vs Program on the example inputs: max |diff| = %.3g", metadata["max_abs_diff"])
        generation = maybe_lower_generation(
            program, out_dir, opts, {k: v for k, v in options.items() if k in _HINTS}
        )
        if generation is not None:
            artifacts.update(generation[0])
            metadata["generation"] = generation[1]
        return LoweringResult(backend=self.name, artifacts=artifacts, metadata=metadata)

    def load(
        self,
        out_dir: Path,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        allow_spinning: bool = True,
        **options: Any,
    ) -> OnnxRuntimeEngine:
        """Opens ``model.onnx`` from ``out_dir``; see :func:`make_session` for the arguments."""
        if options:
            log.info("onnxruntime backend load ignores options %s", sorted(options))
        path = Path(out_dir) / ONNX_FILE
        if not path.is_file():
            raise ValueError(f"{out_dir} has no {ONNX_FILE}; was it lowered with the onnxruntime backend?")
        session = make_session(path, threads=threads, providers=providers, allow_spinning=allow_spinning)
        return OnnxRuntimeEngine(session, path)

    def check_artifacts(self, program: Program, out_dir: Path, artifacts: dict[str, str]) -> dict[str, Any]:
        """The N:M pattern a sparsity pass promised, read back from the saved ``model.onnx``."""
        return nm_artifact_checks(program, Path(out_dir), artifacts)

    def lower_decoder(self, program: Program, out_dir: Path, options: dict[str, Any]) -> dict[str, str]:
        """Writes ``decoder.onnx`` + ``genai_config.json`` (+ ``tokenizer/``) only (same options as lower)."""
        opts = _options(options)
        artifacts, _ = lower_generation(
            program,
            Path(out_dir),
            opset=opts["opset"],
            optimize=opts["optimize"],
            external_data=opts["external_data"],
            hints={k: v for k, v in options.items() if k in _HINTS},
        )
        return artifacts

    def has_decoder(self, out_dir: Path) -> bool:
        return (Path(out_dir) / GENAI_CONFIG).is_file()

    def load_decoder(
        self, out_dir: Path, threads: int | None = None, allow_spinning: bool = True, **options: Any
    ) -> OnnxDecoder:
        """Opens ``decoder.onnx`` of ``out_dir`` (see :class:`~slmopt.backends.onnxrt.generation.OnnxDecoder`)."""
        if options:
            log.info("onnxruntime decoder load ignores options %s", sorted(options))
        return OnnxDecoder(out_dir, threads=threads, allow_spinning=allow_spinning)
