"""The Program: slmopt's single IR, captured with ``torch.export``.

A Program is an *unlifted* ``torch.fx.GraphModule`` (from ``ExportedProgram.module()``: parameters are
``get_attr`` nodes that name attributes of the module, so passes can rewrite weights and subgraphs without
touching an export signature), the example inputs and dynamic-shape spec needed to re-export it, what the
loader knew about the model, and the history of passes applied to it.

Example:
    >>> import torch
    >>> from slmopt.program import capture, ModelInfo
    >>> lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> info = ModelInfo(kind="module", source="demo", input_names=["x"], dynamic_dims=[{0: "batch"}])
    >>> prog = capture(lin, (torch.randn(2, 8),), info)
    >>> prog.num_params()
    72
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

__all__ = ["ModelInfo", "Program", "capture", "count_params", "unwrap_output"]

log = logging.getLogger(__name__)

# Upper bounds for the symbolic dims; export needs finite ranges only for its guards.
_MAX_BATCH = 1024
_MAX_SEQ = 1 << 16


@dataclass
class ModelInfo:
    """What the loader knows about a model; travels with the Program into reports and artifacts.

    Attributes:
        kind: ``"causal-lm"`` (input ids -> logits), ``"encoder"`` (input ids -> last hidden state) or
            ``"module"`` (arbitrary tensor inputs, e.g. one block from a factory).
        source: where the model came from (path or ``module:factory``), for reports.
        input_names: names of the positional graph inputs.
        vocab_size: vocabulary size for token-id inputs.
        max_seq_len: the model's context length, if known.
        byte_level: token ids are raw UTF-8 bytes (no tokenizer needed).
        tokenizer_dir: a directory ``AutoTokenizer.from_pretrained`` can read, if any.
        config: the Hugging Face config as a dict, if any.
        dynamic_dims: for each input, which dims are dynamic (``{0: "batch", 1: "seq"}``).
        dim_bounds: (min, max) of a named dim when the source fixes them (a saved ``.pt2``).
    """

    kind: str
    source: str
    input_names: list[str] = field(default_factory=lambda: ["input_ids"])
    vocab_size: int | None = None
    max_seq_len: int | None = None
    byte_level: bool = False
    tokenizer_dir: str | None = None
    config: dict[str, Any] | None = None
    dynamic_dims: list[dict[int, str]] = field(default_factory=lambda: [{0: "batch", 1: "seq"}])
    dim_bounds: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (min, max) when known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unwrap_output(out: Any) -> torch.Tensor:
    """Returns the single tensor a captured model produces (logits or hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model output must be a tensor or a tuple starting with one, got {type(out).__name__}")


def count_params(module: nn.Module) -> int:
    """Counts unique parameter and buffer-free parameter elements (shared weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _dynamic_shapes(info: ModelInfo, example_inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """Builds the export ``dynamic_shapes`` spec, sharing one Dim object per name across inputs."""
    dims: dict[str, torch.export.Dim] = {}
    spec: list[dict[int, Any] | None] = []
    for i, x in enumerate(example_inputs):
        wanted = info.dynamic_dims[i] if i < len(info.dynamic_dims) else {}
        entry: dict[int, Any] = {}
        for axis, name in wanted.items():
            if axis >= x.dim():
                continue
            if name not in dims:
                upper = _MAX_BATCH if name == "batch" else (info.max_seq_len or _MAX_SEQ)
                # Export specialises dims of size 0/1, so the example must be >= 2 on dynamic axes.
                low, high = info.dim_bounds.get(name, (1, max(upper, 2)))
                dims[name] = torch.export.Dim(name, min=low, max=high)
            entry[axis] = dims[name]
        spec.append(entry or None)
    return tuple(spec)


def _excludes_full_context(err: Exception, info: ModelInfo) -> bool:
    """Export proved every sequence length except the upper bound itself (guard ``seq != max``)."""
    text, top = str(err), info.max_seq_len
    return (
        "Constraints violated (seq)" in text
        and top is not None
        and top > 2
        and "seq" not in info.dim_bounds
        and f"size()[1] != {top}" in text
    )


@dataclass
class Program:
    """A captured model: graph module + inputs to re-export it + metadata + pass history."""

    graph_module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    info: ModelInfo
    history: list[dict[str, Any]] = field(default_factory=list)
    # Backend hints left by passes, e.g. {"fff_lowering": "moe"}; backends read them when lowering.
    lowering_hints: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return unwrap_output(self.graph_module(*inputs))

    def clone(self) -> Program:
        """Deep copy: passes work on their own copy, never on the caller's Program or model."""
        return Program(
            graph_module=copy.deepcopy(self.graph_module),
            example_inputs=tuple(x.clone() for x in self.example_inputs),
            info=copy.deepcopy(self.info),
            history=copy.deepcopy(self.history),
            lowering_hints=copy.deepcopy(self.lowering_hints),
        )

    def num_params(self) -> int:
        return count_params(self.graph_module)

    def num_nodes(self) -> int:
        return len(self.graph.nodes)

    def param(self, target: str) -> torch.Tensor:
        """Returns the parameter or buffer a ``get_attr`` target names."""
        try:
            return self.graph_module.get_parameter(target)
        except AttributeError:
            return self.graph_module.get_buffer(target)

    def set_param(self, target: str, value: torch.Tensor) -> None:
        """Replaces (or creates) the parameter a ``get_attr`` target names, keeping it a Parameter."""
        *path, name = target.split(".")
        owner: nn.Module = self.graph_module
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))

    def recompile(self) -> None:
        """Call after editing the graph: lints, drops dead code and unused parameters, regenerates code."""
        self.graph.eliminate_dead_code(is_impure_node=_is_impure)
        self.graph.lint()
        self.graph_module.delete_all_unused_submodules()
        _delete_unused_params(self.graph_module)
        self.graph_module.recompile()

    def dynamic_shapes(self) -> tuple[Any, ...]:
        return _dynamic_shapes(self.info, self.example_inputs)

    def export(self) -> torch.export.ExportedProgram:
        """Re-exports the (possibly rewritten) graph module with the dynamic batch/sequence dims."""
        with torch.no_grad():
            return torch.export.export(
                self.graph_module, self.example_inputs, dynamic_shapes=self.dynamic_shapes(), strict=False
            )


# FX keeps nodes of ops that *may* be random (dropout, SDPA with its dropout_p) even when nothing reads
# them. A captured Program is in inference mode, so these are pure here and a dead branch must go with its
# weights. Everything else keeps FX's own judgement.
_PURE_IN_INFERENCE = {
    torch.ops.aten.dropout.default,
    torch.ops.aten.scaled_dot_product_attention.default,
    # export's dtype/shape checks: kept alive they would keep a removed branch's weights (q/k norms,
    # fp32 rotary casts in Qwen3 and Cohere) in the Program after prune-attn or elastic.
    torch.ops.aten._assert_tensor_metadata.default,
}


def _is_impure(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _PURE_IN_INFERENCE:
        return False
    return node.is_impure()


def _delete_unused_params(gm: fx.GraphModule) -> None:
    """Drops parameters/buffers no ``get_attr`` node refers to (dead after a rewrite)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers()):
        if name in used:
            continue
        *path, leaf = name.split(".")
        owner: nn.Module = gm
        for part in path:
            owner = getattr(owner, part)
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]


def _set_training(module: nn.Module, training: bool) -> None:
    # Modules unlifted from an ExportedProgram (a loaded .pt2) have no train/eval switch.
    with contextlib.suppress(NotImplementedError):
        module.train(training)


def capture(
    module: nn.Module, example_inputs: tuple[torch.Tensor, ...], info: ModelInfo, copy_params: bool = True
) -> Program:
    """Captures ``module`` into a Program with ``torch.export`` (non-strict, dynamic batch and sequence).

    The user's module is never modified: export traces it, and the Program owns the resulting graph
    module and (copied) parameters.

    Args:
        module: the model; it must return a tensor or a tuple whose first item is the output tensor.
        example_inputs: sample inputs (at least 2 along every dynamic axis).
        info: loader metadata; ``info.dynamic_dims`` says which axes are dynamic.
        copy_params: copy the parameters (default). Loaders pass False for a module they built
            themselves and hand to no one else: the copy would double peak memory for nothing.

    Returns:
        The captured Program.
    """
    # Restore each submodule's own mode: a fresh wrapper (LogitsOnly) is in train mode while the model it
    # wraps is in eval mode, and ``train(True)`` on the wrapper would switch the user's model to training.
    modes = {m: m.training for m in module.modules()}
    _set_training(module, False)
    try:
        with torch.no_grad():
            try:
                ep = torch.export.export(
                    module, example_inputs, dynamic_shapes=_dynamic_shapes(info, example_inputs), strict=False
                )
            except Exception as err:  # noqa: BLE001 - retried once, else re-raised unchanged
                if not _excludes_full_context(err, info):
                    raise
                # MPT's ALiBi takes another branch at exactly max_seq_len tokens, so export proves only
                # seq < max_seq_len: capture that range (one token less context) instead of failing.
                log.info(
                    "capturing with seq <= %d: the model branches at its full context", info.max_seq_len - 1
                )
                info.max_seq_len -= 1  # type: ignore[operator]
                ep = torch.export.export(
                    module, example_inputs, dynamic_shapes=_dynamic_shapes(info, example_inputs), strict=False
                )
    finally:
        for m, training in modes.items():
            m.training = training
    gm = ep.module()
    # The unlifted module shares storage with the user's parameters; copy so rewrites never leak back.
    if copy_params:
        gm = copy.deepcopy(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    return Program(graph_module=gm, example_inputs=tuple(example_inputs), info=info)
