"""The result of structure analysis: blocks, attention and FFN sublayers, linears and norms.

CONTRACT (owned by the core; the implementation of ``slmopt.analysis.analyze.analyze`` fills these in). Node
references are FX node *names* (``node.name``) in ``program.graph``; parameter references are ``get_attr``
targets usable with ``program.param(target)``. ``slmopt.analysis.analyze`` re-exports every name here.

Example:
    >>> from slmopt.analysis.analyze import analyze
    >>> print(analyze(program).summary())  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["AttentionInfo", "BlockInfo", "FFNInfo", "LinearInfo", "NormInfo", "Structure"]


@dataclass
class LinearInfo:
    """One matrix multiply with a parameter weight (``aten.linear``, ``aten.addmm``/``matmul`` with a param).

    Attributes:
        node: FX node name of the multiply.
        weight: ``get_attr`` target of the weight.
        bias: ``get_attr`` target of the bias, or None.
        in_features: size of the reduction (input) dimension.
        out_features: size of the output dimension.
        transposed: True when the weight is stored ``[in, out]`` (GPT-2 Conv1D / addmm); False for
            ``nn.Linear``'s ``[out, in]``. The 2:4 groups always run along the *in* dimension.
        block: index of the transformer block it belongs to, None outside blocks (embeddings, LM head).
        role: ``q``, ``k``, ``v``, ``qkv``, ``o``, ``up``, ``gate``, ``down``, ``gate_up`` (one fused
            projection split into gate and up, as in Phi-3), ``lm_head`` or ``other``.
        rows: for the ``gate``/``up`` views of a fused ``gate_up`` projection, the ``[start, stop)`` range
            of output features this role reads; None when the role uses every output feature.
    """

    node: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool = False
    block: int | None = None
    role: str = "other"
    rows: tuple[int, int] | None = None


@dataclass
class NormInfo:
    """A normalisation (LayerNorm or RMSNorm pattern): its output node and weight/bias targets."""

    node: str
    kind: str  # "layernorm" | "rmsnorm"
    weight: str | None = None
    bias: str | None = None


@dataclass
class AttentionInfo:
    """An attention sublayer: ``residual_add = residual + branch_output``.

    Attributes:
        residual_add: node name of the add that closes the sublayer.
        residual: node name of the residual-stream operand of that add (the sublayer's input stream).
        branch_output: node name of the branch operand (output of the output projection, incl. bias).
        branch_input: node name the branch reads from the stream (usually the norm's output; for
            post-norm models such as BERT the norm comes after the add).
        sdpa: node name of the scaled-dot-product-attention (or softmax) node.
        num_heads / num_kv_heads / head_dim: query heads, key/value heads (GQA), per-head size.
        linears: node names of q/k/v(/qkv) and o projections.
        post_norm: node name of a norm applied right after the residual add (post-norm models), or None.
        branch_norm: node name of a norm on the branch's output before the add (Gemma-2 sandwich norms).
        projection_output: node name of the last projection's output, before any branch norm or constant
            scale (Granite's residual multiplier); equals ``branch_output`` when there is neither.
        q_params / k_params: ``get_attr`` targets of parameters applied between the q (k) projection and
            the attention core, i.e. per-head q/k norms (Qwen3 ``[head_dim]``, Cohere ``[heads, head_dim]``,
            OLMo-2 ``[heads * head_dim]``); cutting heads must cut these too.
        qkv_layout: for a fused ``qkv`` projection: ``"blocked"`` (``[q | k | v]`` along the output
            features, GPT-2) or ``"interleaved"`` (``[q_h | k_h | v_h]`` per head, GPT-NeoX).
    """

    block: int
    residual_add: str
    residual: str
    branch_output: str
    branch_input: str
    sdpa: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    linears: list[str] = field(default_factory=list)
    post_norm: str | None = None
    branch_norm: str | None = None
    projection_output: str = ""
    qkv_layout: str = "blocked"
    q_params: list[str] = field(default_factory=list)
    k_params: list[str] = field(default_factory=list)


@dataclass
class FFNInfo:
    """A feed-forward sublayer: plain ``down(act(up(x)))`` or gated ``down(act(gate(x)) * up(x))``.

    Attributes:
        residual_add / residual / branch_output / branch_input / post_norm / branch_norm /
            projection_output: as in AttentionInfo.
        kind: ``"mlp"`` or ``"gated"``.
        activation: ``gelu`` (erf), ``gelu_tanh``, ``silu`` or ``relu``.
        up / gate / down: the LinearInfo of each projection (``gate`` None for plain MLPs).
        width: intermediate size (number of neurons).
    """

    block: int
    residual_add: str
    residual: str
    branch_output: str
    branch_input: str
    kind: str
    activation: str
    up: LinearInfo
    down: LinearInfo
    gate: LinearInfo | None = None
    width: int = 0
    post_norm: str | None = None
    branch_norm: str | None = None
    projection_output: str = ""


@dataclass
class BlockInfo:
    """One transformer block: its sublayers, norms, parameter count and (hint-derived) module name."""

    index: int
    attention: AttentionInfo | None = None
    ffn: FFNInfo | None = None
    norms: list[NormInfo] = field(default_factory=list)
    name: str | None = None  # common module path from nn_module_stack, for display only
    params: int = 0  # unique parameter elements used by the block's sublayers and norms


@dataclass
class Structure:
    """Everything analysis found, plus what it could not classify (reported, never guessed)."""

    blocks: list[BlockInfo]
    linears: list[LinearInfo]
    hidden_size: int | None
    embedding: str | None = None  # get_attr target of the token embedding
    lm_head: LinearInfo | None = None
    params: int = 0
    unclassified: list[str] = field(default_factory=list)  # human-readable notes
    embedding_params: int = 0
    final_norm: NormInfo | None = None  # norm between the last residual add and the head (pre-norm models)
    norms: list[NormInfo] = field(default_factory=list)  # every norm found, in graph order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def linear(self, node: str) -> LinearInfo:
        for info in self.linears:
            if info.node == node:
                return info
        raise KeyError(node)

    def format_table(self) -> str:
        """One row per block: attention heads, FFN kind/activation/width, norms and parameters."""
        roles = {info.node: info.role for info in self.linears}
        rows = [("block", "module", "attention (heads/kv x dim: projections)", "ffn", "norms", "params")]
        for b in self.blocks:
            a, f = b.attention, b.ffn
            post = {a.post_norm if a else None, f.post_norm if f else None}
            on_branch = {a.branch_norm if a else None, f.branch_norm if f else None} - {None}
            rows.append((
                str(b.index),
                b.name or "-",
                f"{a.num_heads}/{a.num_kv_heads} x {a.head_dim}: {','.join(roles[n] for n in a.linears)}" if a else "-",
                f"{f.kind}{' fused' if f.up.rows else ''} {f.activation} x{f.width}" if f else "-",
                ", ".join(
                    n.kind + (" (post)" if n.node in post else " (branch)" if n.node in on_branch else "")
                    for n in b.norms
                ) or "-",
                f"{b.params:,}",
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        )

    def summary(self, verbose: bool = False) -> str:
        """The text ``slmopt inspect`` prints: header, block table, head, notes; ``verbose`` lists every linear.

        Example:
            >>> print(analyze(program).summary())  # doctest: +SKIP
            2 blocks, hidden 64, 78,144 parameters (token embedding 8,192; per block 30,848, 30,848)
            ...
        """
        per_block = ", ".join(f"{b.params:,}" for b in self.blocks[:4]) + (
            ", ..." if len(self.blocks) > 4 else ""
        )
        norm, head = self.final_norm, self.lm_head
        lines = [
            f"{len(self.blocks)} block{'' if len(self.blocks) == 1 else 's'}, hidden {self.hidden_size}, {self.params:,} parameters "
            f"(token embedding {self.embedding_params:,}; per block {per_block or '-'})",
            f"token embedding: {self.embedding or '-'}",
            self.format_table(),
            f"final norm: {norm.kind} '{norm.node}'" if norm else "final norm: -",
            f"lm head: '{head.node}' {head.in_features}->{head.out_features} ({head.weight})" if head else "lm head: -",
        ]  # fmt: skip
        if verbose:
            lines.append("linears:")
            lines += [
                f"  {i.node:<16} {i.role:<8} block {'-' if i.block is None else i.block:<3} "
                f"{i.in_features}->{i.out_features}{' [in,out]' if i.transposed else ''}  {i.weight}"
                for i in self.linears
            ]
        lines.append("unclassified:" + ("" if self.unclassified else " none"))
        lines += [f"  - {note}" for note in self.unclassified]
        return "\n".join(lines)
