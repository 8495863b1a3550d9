"""The ``onnxruntime`` backend: a Program exported to ONNX (``model.onnx``) and run in ONNX Runtime.

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
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from slmopt.backends.torch_backend import custom_ops_in
from slmopt.lowering import Backend, Engine, LoweringResult, onnx_translations

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

    from slmopt.program import Program

__all__ = [
    "DEFAULT_OPSET",
    "MAX_IR_VERSION",
    "ONNX_DATA_FILE",
    "ONNX_FILE",
    "OnnxRuntimeBackend",
    "OnnxRuntimeEngine",
    "export_onnx",
    "make_session",
    "onnx_op_histogram",
    "run_onnx",
]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 18  # torchlib's native opset; 18-22 verified with ORT 1.31, 23 is not (see module doc)
MAX_IR_VERSION = 13  # the newest IR version ONNX Runtime 1.31 loads
# Weights above this go to model.onnx.data: no serialised in-memory copy of them during export.
EXTERNAL_DATA_THRESHOLD = 64 << 20
OUTPUT_NAMES = {"causal-lm": "logits", "encoder": "last_hidden_state", "module": "output"}
_OPTIONS = {"opset", "external_data", "optimize", "verify", "generation"}
# Hints for custom-op lowerings (see slmopt.backends.onnxrt.fff); they override the Program's own hints.
_HINTS = {"fff_lowering", "fff_routing", "fff_moe_exact"}
_NUMPY_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


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


def make_session(
    path: str | Path,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    allow_spinning: bool = True,
) -> ort.InferenceSession:
    """Opens an ONNX Runtime session with slmopt's settings.

    Args:
        path: the ``.onnx`` file (external data is found next to it).
        threads: ``intra_op_num_threads``; None lets ORT choose (all cores).
        providers: execution providers in preference order; CPU is always appended as the fallback.
            Unavailable providers are skipped with a warning.
        allow_spinning: let idle intra-op threads busy-wait. Turn off when other engines share the
            cores (interleaved benchmarks), so spinning workers do not steal time from them.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    available = set(ort.get_available_providers())
    chosen = []
    for provider in providers or ():
        if provider in available:
            chosen.append(provider)
        else:
            log.warning(
                "ONNX Runtime provider %s is not available here (have: %s)", provider, sorted(available)
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)


class OnnxRuntimeEngine(Engine):
    """Runs an ONNX Runtime session on torch tensors; returns the first output as a torch tensor.

    Inputs are matched to the session's inputs by position (named as in the model) and cast to the
    dtype each input declares (token ids to int64).
    """

    backend: ClassVar[str] = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, path: str | Path = "") -> None:
        self.session = session
        self.path = str(path)
        self.inputs = [(i.name, _NUMPY_DTYPES.get(i.type)) for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def feeds(self, *inputs: torch.Tensor) -> dict[str, np.ndarray]:
        """The ``{name: array}`` dict ``session.run`` takes for these positional inputs."""
        if len(inputs) != len(self.inputs):
            names = [name for name, _ in self.inputs]
            raise TypeError(f"model takes {len(self.inputs)} inputs {names}, got {len(inputs)}")
        feeds = {}
        for (name, dtype), x in zip(self.inputs, inputs, strict=True):
            array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            feeds[name] = array.astype(dtype, copy=False) if dtype is not None else array
        return feeds

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.session.run(self.output_names[:1], self.feeds(*inputs))[0]
        return torch.from_numpy(np.asarray(out))

    def describe(self) -> str:
        providers = ",".join(p.removesuffix("ExecutionProvider") for p in self.session.get_providers())
        threads = self.session.get_session_options().intra_op_num_threads
        return f"onnxruntime ({providers}, {threads or 'auto'} threads)"


def run_onnx(
    path: str | Path, inputs: Sequence[torch.Tensor] | Mapping[str, Any], threads: int | None = 1
) -> torch.Tensor:
    """Runs an ONNX file once on the CPU and returns its first output.

    Args:
        path: the ``.onnx`` file.
        inputs: positional tensors, or a ``{input name: tensor/array}`` dict.
        threads: intra-op threads.

    Example:
        >>> # logits = run_onnx("out/model.onnx", (ids,))
    """
    engine = OnnxRuntimeEngine(make_session(path, threads=threads), path)
    if isinstance(inputs, Mapping):
        order = [name for name, _ in engine.inputs]
        missing = set(order) - set(inputs)
        if missing:
            raise ValueError(f"missing ONNX inputs {sorted(missing)}; the model takes {order}")
        inputs = [torch.as_tensor(np.asarray(inputs[name])) for name in order]
    return engine(*inputs)


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
                explicit KV cache, ``genai_config.json`` and ``tokenizer/`` (see
                :mod:`slmopt.backends.onnxrt.generation`).

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
        from slmopt.backends.onnxrt.generation import maybe_lower_generation

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
