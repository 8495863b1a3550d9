"""Running a Program on calibration data: record chosen node values batch by batch, stop early.

The one interpreter every calibration-driven pass uses (2:4 statistics, FFF input collection, importance
scores, recovery fits): values are handed over per batch, so activations are never all held at once, and
the forward stops as soon as every recorded node has been computed.

Example:
    >>> # for acts in stream_activations(program, ["add_6"], calib):
    >>> #     total += acts["add_6"].pow(2).sum()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from tqdm.auto import tqdm

from slmopt.program import unwrap_output

if TYPE_CHECKING:
    from slmopt.program import Program

__all__ = ["CALIB_BATCH", "GraphRunner", "calib_batches", "stream_activations"]

CALIB_BATCH = 8  # calibration rows per forward: bounds activation memory, keeps GEMMs reasonably sized


class _Stop(Exception):
    """Raised once every recorded node has been seen: nothing downstream is needed."""


class GraphRunner(fx.Interpreter):
    """Runs a Program's graph node by node, recording chosen values and optionally ablating sublayers.

    Args:
        gm: the graph module.
        replace: ``{node: other node}``: ``node`` takes ``other``'s value instead of being computed
            (``{residual add: stream}`` removes a sublayer exactly as the rewrite does).
        record: node names whose values are handed to ``on_value``.
        on_value: ``callback(name, tensor)``.
        stop_early: stop the forward once every recorded node has been seen.

    Example:
        >>> runner = GraphRunner(program.graph_module, replace={"add_6": "to_6"})  # doctest: +SKIP
        >>> logits = runner.run(ids)  # doctest: +SKIP
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        replace: Mapping[str, str] | None = None,
        record: Sequence[str] = (),
        on_value: Callable[[str, torch.Tensor], None] | None = None,
        stop_early: bool = False,
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        by_name = {n.name: n for n in gm.graph.nodes}
        missing = [n for n in [*(replace or {}), *(replace or {}).values(), *record] if n not in by_name]
        if missing:
            raise ValueError(f"nodes not in the graph: {missing}")
        self.replace = {name: by_name[other] for name, other in (replace or {}).items()}
        self.record, self.on_value, self.stop_early = set(record), on_value, stop_early
        self._pending: set[str] = set()

    def run_node(self, n: fx.Node) -> Any:
        # The replaced value is still alive here: the add is one of its users, so not yet collected.
        out = self.env[self.replace[n.name]] if n.name in self.replace else super().run_node(n)
        if n.name in self.record and self.on_value is not None:
            self.on_value(n.name, out)
            self._pending.discard(n.name)
            if self.stop_early and not self._pending:
                raise _Stop
        return out

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | None:
        """Runs the graph; returns the model output, or None when it stopped early."""
        self._pending = set(self.record)
        try:
            with torch.no_grad():
                return unwrap_output(self.run(*inputs))
        except _Stop:
            return None


def calib_batches(calib: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[torch.Tensor]:
    """Consecutive ``batch_size``-row slices of ``calib``, with an optional progress bar."""
    starts = range(0, len(calib), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield calib[start : start + batch_size]


def stream_activations(
    program: Program,
    nodes: Sequence[str],
    calib: torch.Tensor,
    batch_size: int = CALIB_BATCH,
    progress: bool = False,
    desc: str = "activations",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields ``{node name: value}`` for each calibration batch (only the graph up to the last node runs).

    Consumers accumulate statistics batch by batch, so activations are never all held at once.

    Example:
        >>> for acts in stream_activations(program, ["add_6", "to_6"], calib):  # doctest: +SKIP
        ...     print(acts["add_6"].shape)
        torch.Size([8, 256, 64])
    """
    values: dict[str, torch.Tensor] = {}
    runner = GraphRunner(
        program.graph_module, record=list(nodes), on_value=values.__setitem__, stop_early=True
    )
    for batch in calib_batches(calib, batch_size, progress, desc):
        values.clear()
        runner.forward(batch)
        yield dict(values)
