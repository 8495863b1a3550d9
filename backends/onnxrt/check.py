"""Checks N:M (2:4) sparsity of the matmul weights in a saved ONNX model.

Every initializer (or ``Constant``) that feeds a matrix multiply is checked along its **reduction** axis,
found from the consuming op and any ``Transpose``/``Cast``/``Identity`` between the two:

==============  ==========  ====================================================
op              input       reduction axis of the stored tensor
==============  ==========  ====================================================
MatMul          B (1)       second to last (``[in, out]``, as torch exports it)
MatMul          A (0)       last
Gemm            B (1)       1 if ``transB=1`` (``[out, in]``) else 0
Gemm            A (0)       0 if ``transA=1`` else 1
FusedMatMul     A/B         as MatMul, with ``transA``/``transB`` on the last two
==============  ==========  ====================================================

A 2:4 weight read along the wrong axis still scores ≈ 0.69 valid groups, so a weight passes only with a
valid fraction of *exactly* 1.0 (and no ``-0.0``) on the right axis.

Which weights should be N:M: the ``names`` given (parameter targets such as
``model.layers.0.mlp.up_proj.weight``), matched against initializer names *and* the names they were
folded from — torch's dynamo exporter constant-folds ``Wᵀ`` into an anonymous ``val_N`` initializer and
records the source in ``value_info`` metadata ``pkg.onnxscript.optimizer.folded_from`` — and, as a last
resort, the consuming node's module scope (``pkg.torch.onnx.name_scopes``) plus ``.weight``. Names are
compared after normalisation (``p_`` prefix dropped, every separator to ``_``), exactly or by a unique
suffix at a ``_`` boundary. Without ``names``, every matmul weight with at least ``(m - n)/m`` zeros is
taken to be meant as N:M (a dense weight is then ignored; a sparse one on the wrong axis fails).

Example:
    >>> # report = check_nm_onnx("out/model.onnx", names=["model.layers.0.mlp.up_proj.weight"])
    >>> # report.passed(), print(report.table())
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slmopt.backends.onnxrt.blocks import block_rows, element_size, read_blocks
from slmopt.sparsity import count_negative_zeros, nm_group_counts, validate_nm

__all__ = ["NMCheckReport", "NMWeightRow", "check_nm_onnx", "normalize_name"]

log = logging.getLogger(__name__)

_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
# Ops that pass a weight through unchanged up to a permutation of axes.
_PASS_THROUGH = ("Cast", "Identity", "Transpose")


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _gemm_axes(node: onnx.NodeProto) -> list[tuple[int, Callable[[int], int]]]:
    ta, tb = _attr(node, "transA", 0), _attr(node, "transB", 0)
    return [(0, lambda nd: nd - 2 if ta else nd - 1), (1, lambda nd: nd - 1 if tb else nd - 2)]


def _matmul_axes(node: onnx.NodeProto) -> list[tuple[int, Callable[[int], int]]]:
    return [(0, lambda nd: nd - 1), (1, lambda nd: max(nd - 2, 0))]


# op_type -> (input index, reduction axis as a function of the operand's rank) for each weight operand.
_MATMUL_RULES: dict[str, Callable[[onnx.NodeProto], list[tuple[int, Callable[[int], int]]]]] = {
    "MatMul": _matmul_axes,
    "Gemm": _gemm_axes,
    "FusedMatMul": _gemm_axes,
}


def normalize_name(name: str) -> str:
    """Canonical key for matching parameter targets and ONNX initializer names.

    Example:
        >>> normalize_name("p_model_layers_0_mlp_up_proj_weight") == normalize_name("model.layers.0.mlp.up_proj.weight")
        True
    """
    key = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return re.sub(r"^[pbc]_", "", key)


@dataclass(frozen=True)
class NMWeightRow:
    """One matmul weight as stored in the ONNX file, checked along its reduction axis.

    Attributes:
        name: initializer (or Constant output) name.
        sources: names this tensor is known by (folded-from names, module scope), for matching.
        op: consuming op type; node: its name.
        shape: stored shape; axis: the reduction axis in that shape.
        valid_fraction: exact fraction of groups with at most n nonzeros (None: axis not divisible by m).
        zero_fraction: fraction of exact zeros; negative_zeros: count of ``-0.0``.
        expected: whether this weight should be N:M.
        note: why it fails or was selected, for humans.
    """

    name: str
    sources: tuple[str, ...]
    op: str
    node: str
    shape: tuple[int, ...]
    axis: int
    valid_fraction: float | None
    zero_fraction: float
    negative_zeros: int
    expected: bool = False
    note: str = ""

    @property
    def valid(self) -> bool:
        """N:M on the reduction axis: every group valid and no ``-0.0``."""
        return self.valid_fraction == 1.0 and self.negative_zeros == 0

    @property
    def ok(self) -> bool:
        return self.valid or not self.expected


@dataclass
class NMCheckReport:
    """Rows for every matmul weight plus which expected names had no weight in the file.

    Example:
        >>> # report = check_nm_onnx(path, names=targets); assert report.passed(), report.table()
    """

    path: str
    n: int
    m: int
    rows: list[NMWeightRow] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    selection: str = "auto"

    def passed(self, names: Iterable[str] | None = None) -> bool:
        """True only if every weight that should be N:M is exactly N:M with no ``-0.0``.

        Without ``names``, a file in which no weight was expected to be N:M fails too: the check exists
        to confirm sparsity, and "nothing to check" usually means the masking never happened.

        Args:
            names: re-select the expected weights by parameter name (default: the selection made by
                :func:`check_nm_onnx`). A name with no matching weight fails the check.
        """
        if names is None:
            return not self.missing and any(r.expected for r in self.rows) and all(r.ok for r in self.rows)
        rows, missing = _select(self.rows, list(names), self.n, self.m)
        return not missing and all(r.valid for r in rows)

    def failures(self) -> list[NMWeightRow]:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        """Human-readable table, failures marked."""
        lines = [f"{'status':<6} {'valid':>7} {'zeros':>6} {'-0.0':>5} axis  shape          weight"]
        for r in self.rows:
            status = ("ok" if r.valid else "FAIL") if r.expected else "-"
            frac = "n/a" if r.valid_fraction is None else f"{r.valid_fraction:.4f}"
            label = r.sources[0] if r.sources else r.name
            lines.append(
                f"{status:<6} {frac:>7} {r.zero_fraction:6.3f} {r.negative_zeros:>5} {r.axis:>4}  "
                f"{str(list(r.shape)):<14} {label} ({r.op} {r.name})"
            )
        lines += [f"MISSING {name}" for name in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed()
        return out


def _metadata(props: Iterable[onnx.StringStringEntryProto]) -> dict[str, str]:
    return {p.key: p.value for p in props}


def _parse_list(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


class _Graph:
    """Lookup tables over an ONNX graph: constants, producers, value metadata."""

    def __init__(self, model: onnx.ModelProto, base_dir: str) -> None:
        g = model.graph
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in g.initializer}
        self.constants: dict[str, onnx.TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant" and _attr(node, "value", None) is not None:
                self.constants[node.output[0]] = _attr(node, "value", None)
        self.value_meta = {v.name: _metadata(v.metadata_props) for v in g.value_info}

    def trace(self, name: str, axis: int, rank: int) -> tuple[str, int] | None:
        """Follows pass-through ops back to a constant; returns (constant name, axis in it) or None."""
        for _ in range(8):  # a weight never hides behind more than a couple of casts/transposes
            if name in self.initializers or name in self.constants:
                return name, axis
            node = self.producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                return None
            if node.op_type == "Transpose":
                perm = _attr(node, "perm", None) or list(reversed(range(rank)))
                axis = perm[axis]
            name = node.input[0]
        return None

    def tensor(self, name: str) -> onnx.TensorProto:
        return self.initializers.get(name) or self.constants[name]

    def blocks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        """``name``'s value in blocks of ``rows`` along axis 0 (see :func:`slmopt.backends.onnxrt.blocks.read_blocks`)."""
        return read_blocks(self.tensor(name), self.base_dir, rows)

    def rank(self, name: str) -> int | None:
        tensor = self.initializers.get(name) or self.constants.get(name)
        if tensor is not None:
            return len(tensor.dims)
        node = self.producer.get(name)
        if node is not None and node.op_type in _PASS_THROUGH:
            return self.rank(node.input[0])
        return None

    def sources(self, name: str, node: onnx.NodeProto) -> tuple[str, ...]:
        """Names ``name`` is known by: itself, what it was folded from (recursively), its module scope."""
        found, stack = [], [name]
        while stack:
            cur = stack.pop(0)
            if cur in found:
                continue
            found.append(cur)
            stack.extend(_parse_list(self.value_meta.get(cur, {}).get(_FOLDED_FROM, "[]")))
        named = [s for s in found if not re.fullmatch(r"(val|_v)_?\d+", s)]
        if not named:
            scopes = _parse_list(_metadata(node.metadata_props).get(_NAME_SCOPES, "[]"))
            if len(scopes) >= 2 and scopes[-2]:
                named.append(f"{scopes[-2]}.weight")
        return tuple(named + [s for s in found if s not in named])


def _select(rows: list[NMWeightRow], names: list[str], n: int, m: int) -> tuple[list[NMWeightRow], list[str]]:
    """Rows matching ``names`` (exact normalised match, else a unique ``_``-boundary suffix match)."""
    keys = [(r, {normalize_name(s) for s in (r.name, *r.sources)}) for r in rows]
    chosen: dict[str, NMWeightRow] = {}
    missing: list[str] = []
    for wanted in names:
        key = normalize_name(wanted)
        hits = [r for r, ks in keys if key in ks]
        if not hits:
            hits = [r for r, ks in keys if any(k.endswith("_" + key) or key.endswith("_" + k) for k in ks)]
        if len({r.name for r in hits}) != 1:
            missing.append(wanted if not hits else f"{wanted} (ambiguous: {sorted({r.name for r in hits})})")
            continue
        for r in hits:
            chosen[f"{r.name}:{r.axis}"] = r
    return list(chosen.values()), missing


def check_nm_onnx(
    path: str | Path | onnx.ModelProto, n: int = 2, m: int = 4, names: Iterable[str] | None = None
) -> NMCheckReport:
    """Checks the N:M sparsity of every matmul weight in an ONNX model along its reduction axis.

    Args:
        path: ``.onnx`` file (external data next to it is read) or an in-memory ModelProto.
        n: nonzeros allowed per group.
        m: group size.
        names: parameter targets that must be N:M; None = every matmul weight with >= (m-n)/m zeros.

    Returns:
        The report; ``report.passed()`` is the verdict, ``report.table()`` the explanation.

    Example:
        >>> # check_nm_onnx("model.onnx", names=["model.layers.0.mlp.up_proj.weight"]).passed()
    """
    validate_nm(n, m)
    if isinstance(path, onnx.ModelProto):
        model, label, base_dir = path, "<ModelProto>", "."
    else:
        # Tensors are read one at a time from external data: no whole-model copy in memory.
        model, label, base_dir = (
            onnx.load(str(path), load_external_data=False),
            str(path),
            str(Path(path).parent),
        )
    graph = _Graph(model, base_dir)
    rows: dict[tuple[str, int], NMWeightRow] = {}
    for node in model.graph.node:
        rule = _MATMUL_RULES.get(node.op_type)
        if rule is None:
            continue
        for index, axis_of in rule(node):
            if index >= len(node.input):
                continue
            rank = graph.rank(node.input[index])
            if rank is None or rank < 2:
                continue  # an activation, not a weight
            traced = graph.trace(node.input[index], axis_of(rank), rank)
            if traced is None or traced in rows:
                continue
            name, axis = traced
            rows[traced] = _measure(graph, name, axis, node, n, m)
    report = NMCheckReport(label, n, m, list(rows.values()))
    if names is not None:
        report.selection = "names"
        selected, report.missing = _select(report.rows, list(names), n, m)
        chosen = {(r.name, r.axis) for r in selected}
        report.rows = [_mark(r, (r.name, r.axis) in chosen, "named") for r in report.rows]
    else:
        threshold = (m - n) / m
        report.rows = [
            _mark(r, r.zero_fraction >= threshold, f">= {threshold:.2f} zeros") for r in report.rows
        ]
    for r in report.failures():
        log.warning(
            "N:M check failed for %s (%s): valid fraction %s on axis %d",
            r.name,
            r.sources,
            r.valid_fraction,
            r.axis,
        )
    return report


def _mark(row: NMWeightRow, expected: bool, why: str) -> NMWeightRow:
    if not expected:
        return row
    problems = []
    if row.valid_fraction is None:
        problems.append(f"axis {row.axis} of size {row.shape[row.axis]} is not a multiple of the group size")
    elif row.valid_fraction != 1.0:
        problems.append(f"only {row.valid_fraction:.4f} of groups valid on axis {row.axis}")
    if row.negative_zeros:
        problems.append(f"{row.negative_zeros} negative zeros")
    return NMWeightRow(**{**asdict(row), "expected": True, "note": "; ".join([why, *problems])})


def _measure(graph: _Graph, name: str, axis: int, node: onnx.NodeProto, n: int, m: int) -> NMWeightRow:
    tensor = graph.tensor(name)
    shape = tuple(int(d) for d in tensor.dims)
    size = int(np.prod(shape, dtype=np.int64))
    grouped = not shape[axis] % m
    zeros = negative = valid = total = 0
    itemsize = element_size(tensor)
    for block in graph.blocks(name, block_rows(shape, axis, m, itemsize)):
        block = block if block.dtype in (np.float32, np.float64) else block.astype(np.float32)
        zeros += int(np.count_nonzero(block == 0))
        negative += count_negative_zeros(block)
        if grouped and block.size:
            got = nm_group_counts(block, n, m, axis)
            valid, total = valid + got[0], total + got[1]
    fraction = None if not grouped else 1.0 if total == 0 else valid / total
    return NMWeightRow(
        name=name,
        sources=graph.sources(name, node),
        op=node.op_type,
        node=node.name,
        shape=shape,
        axis=axis,
        valid_fraction=fraction,
        zero_fraction=zeros / max(size, 1),
        negative_zeros=negative,
    )
