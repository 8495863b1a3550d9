"""ONNX export of a Program for the ``onnxruntime`` (and ``tensorrt``) backends: ``model.onnx``.

Lowering re-exports the Program with its dynamic batch/sequence dims, converts the ExportedProgram with
``torch.onnx.export(..., dynamo=True)`` (custom ops such as ``slmopt::fff`` through the translation table
of :func:`slmopt.lowering.onnx_translations`), names inputs/outputs and dynamic axes, keeps the IR version
loadable by ONNX Runtime 1.31 (≤ 13), validates the file with ``onnx.checker`` and runs it once in ONNX
Runtime against the Program. Large models (> 1 GiB of weights) keep their weights in ``model.onnx.data``.

Facts checked on torch 2.13 / onnxscript 0.7 / ORT 1.31 (tiny Llama, Qwen2, GPT-2, BERT):

* the HF rotary embedding's ``@torch.no_grad`` (``wrap_with_set_grad_enabled``) and the
  ``aten._assert_tensor_metadata`` nodes do not reach ONNX: ``Program.export`` runs under ``no_grad`` and
  the exporter's decompositions drop them;
* at opset 23 the onnxscript optimizer fuses rotary embeddings into ``RotaryEmbedding``, which ORT 1.31
  rejects for batch > 1 (cos/sin cache shape); opsets 18–22 export and run correctly — hence the default
  of 18 and the run-once check after export.

Example:
    >>> # meta = export_onnx(program, Path("out/model.onnx"), opset=DEFAULT_OPSET)
    >>> # onnx_op_histogram("out/model.onnx")["MatMul"]
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slmopt.backends.onnxrt.rewrite import rewrite_for_ort
from slmopt.backends.torch_backend import custom_ops_in
from slmopt.lowering import onnx_translations

if TYPE_CHECKING:
    import onnx

    from slmopt.program import Program

__all__ = [
    "DEFAULT_OPSET",
    "MAX_IR_VERSION",
    "ONNX_DATA_FILE",
    "ONNX_FILE",
    "OUTPUT_NAMES",
    "export_onnx",
    "onnx_op_histogram",
]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 18  # torchlib's native opset; 18-22 verified with ORT 1.31, 23 is not (see module doc)
MAX_IR_VERSION = 13  # the newest IR version ONNX Runtime 1.31 loads
# Weights above this go to model.onnx.data: no serialised in-memory copy of them during export.
EXTERNAL_DATA_THRESHOLD = 64 << 20
OUTPUT_NAMES = {"causal-lm": "logits", "encoder": "last_hidden_state", "module": "output"}


def _program_nbytes(program: Program) -> int:
    """Bytes of the Program's weights, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(program.graph_module.parameters()) + list(program.graph_module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _axis_names(
    program: Program, exported: torch.export.ExportedProgram
) -> tuple[dict[int, str] | None, ...]:
    """ONNX names for the dynamic axes (``{0: "batch", 1: "seq"}``), only where export kept them symbolic.

    Naming an axis export specialised would make the exporter's renaming fail, so each axis is checked
    against the placeholder's fake tensor.
    """
    user_inputs = [
        spec.arg.name
        for spec in exported.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    vals = {n.name: n.meta.get("val") for n in exported.graph.nodes if n.op == "placeholder"}
    names: list[dict[int, str] | None] = []
    for i, arg_name in enumerate(user_inputs):
        wanted = program.info.dynamic_dims[i] if i < len(program.info.dynamic_dims) else {}
        val = vals.get(arg_name)
        shape = getattr(val, "shape", ())
        kept = {
            int(axis): name
            for axis, name in wanted.items()
            if int(axis) < len(shape) and isinstance(shape[int(axis)], torch.SymInt)
        }
        names.append(kept or None)
    return tuple(names)


def export_onnx(
    program: Program,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    optimize: bool = True,
    hints: Mapping[str, Any] | None = None,
    output_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Exports a Program to an ONNX file that ONNX Runtime 1.31 loads, and validates it.

    Args:
        program: the Program (not modified: ``Program.export`` traces its graph module afresh).
        path: the ``.onnx`` file to write; external weights go next to it as ``<name>.data``.
        opset: default-domain opset (>= 18).
        external_data: weights in a separate file; None decides by size (> 1 GiB).
        optimize: run the exporter's ONNX optimizer (constant folding, redundancy elimination).
        hints: custom-op lowering hints (``fff_lowering``...); default: the Program's ``lowering_hints``.
        output_names: names of the graph outputs; default: one output named after the model kind.

    Returns:
        Metadata: opset, ir_version, external_data, input/output names, op histogram, file sizes.

    Example:
        >>> # meta = export_onnx(program, "out/model.onnx"); meta["op_histogram"]["MatMul"]
    """
    import onnx

    path = Path(path)
    started = time.perf_counter()
    exported = program.export()
    if "slmopt::fff" in custom_ops_in(exported.graph):
        import slmopt.backends.onnxrt.fff  # noqa: F401 - registers the slmopt::fff translations
    hints = {**program.lowering_hints, **(hints or {})}
    n_inputs = len(program.example_inputs)
    input_names = list(program.info.input_names)
    if len(input_names) != n_inputs:
        log.warning(
            "info.input_names %s does not match %d inputs; using exporter names", input_names, n_inputs
        )
        input_names = []
    output_name = OUTPUT_NAMES.get(program.info.kind, "output")
    onnx_program = torch.onnx.export(
        exported,
        (),
        dynamo=True,
        input_names=input_names or None,
        output_names=list(output_names or [output_name]),
        # For an ExportedProgram the exporter only uses string dims to rename the symbolic axes.
        dynamic_shapes=_axis_names(program, exported),
        opset_version=opset,
        custom_translation_table=onnx_translations(hints) or None,
        optimize=optimize,
        verbose=False,
    )
    if onnx_program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    model = onnx_program.model
    if model.ir_version > MAX_IR_VERSION:
        # The ops we emit exist at IR 13; newer IR only adds types ORT 1.31 cannot load anyway.
        log.info("lowering ONNX IR version %d to %d for ONNX Runtime", model.ir_version, MAX_IR_VERSION)
        model.ir_version = MAX_IR_VERSION
    rewrites = rewrite_for_ort(model)  # spellings ORT's fusions match (RMSNorm -> one kernel)
    if external_data is None:
        external_data = _program_nbytes(program) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)  # a stale weights file would be mistaken for this export's
    onnx_program.save(str(path), external_data=external_data)
    external_data = data_path.is_file()  # the exporter also externalises past protobuf's 2 GiB limit
    # Path-based check: it handles external data and models beyond protobuf's 2 GiB message limit.
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    return {
        "opset": opsets.get("", opset),
        "opset_imports": opsets,
        "ir_version": proto.ir_version,
        "external_data": external_data,
        "optimized": optimize,
        "ort_rewrites": rewrites,
        "input_names": [i.name for i in proto.graph.input],
        "output_names": [o.name for o in proto.graph.output],
        "op_histogram": onnx_op_histogram(proto),
        "num_nodes": len(proto.graph.node),
        "file_size_bytes": path.stat().st_size + (data_path.stat().st_size if external_data else 0),
        "export_seconds": round(time.perf_counter() - started, 3),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }


def onnx_op_histogram(model: str | Path | onnx.ModelProto) -> dict[str, int]:
    """Counts ONNX ops by ``op_type``, most frequent first.

    Nodes inside subgraphs (``If``/``Loop`` bodies) and model-local functions are counted as well (a
    function call counts once itself plus once per node of its body), so an op wrapped by the exporter
    still shows up. Weights are not loaded.

    Args:
        model: a path to a ``.onnx`` file or a loaded ``ModelProto``.

    Example:
        >>> # onnx_op_histogram("out/model.onnx")["MatMul"]
    """
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    functions = {(f.domain, f.name): f for f in proto.functions}
    counts: Counter[str] = Counter()

    def visit(nodes: Sequence[onnx.NodeProto], depth: int) -> None:
        for node in nodes:
            counts[node.op_type] += 1
            body = functions.get((node.domain, node.op_type))
            if body is not None and depth < 16:  # depth guard: recursive functions are invalid anyway
                visit(body.node, depth + 1)
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g.node, depth + 1)
                for graph in attr.graphs:
                    visit(graph.node, depth + 1)

    visit(proto.graph.node, 0)
    return dict(counts.most_common())
