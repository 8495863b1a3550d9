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

__all__ = ["CALIB_BATCH", "GraphRunner", "PrefixCache", "calib_batches", "stream_activations"]

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
                self.env[n] = out  # kept for a PrefixCache: the stop skips the interpreter's store
                raise _Stop
        return out

    def forward(
        self, *inputs: torch.Tensor, initial_env: dict[fx.Node, Any] | None = None
    ) -> torch.Tensor | None:
        """Runs the graph; returns the model output, or None when it stopped early.

        ``initial_env`` (node -> value) marks nodes as already computed (see :class:`PrefixCache`).
        """
        self._pending = set(self.record)
        try:
            with torch.no_grad():
                return unwrap_output(self.run(*inputs, initial_env=initial_env))
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
    cache: PrefixCache | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields ``{node name: value}`` for each calibration batch (only the graph up to the last node runs).

    Consumers accumulate statistics batch by batch, so activations are never all held at once.

    With a :class:`PrefixCache` (one node recorded), each batch resumes from the values the cache saved
    at an earlier node of the graph instead of running it from the inputs, and the cache then moves to
    ``nodes[0]``: collecting layer after layer costs one pass over the model, not one per layer.

    Example:
        >>> for acts in stream_activations(program, ["add_6", "to_6"], calib):  # doctest: +SKIP
        ...     print(acts["add_6"].shape)
        torch.Size([8, 256, 64])
    """
    values: dict[str, torch.Tensor] = {}
    runner = GraphRunner(
        program.graph_module, record=list(nodes), on_value=values.__setitem__, stop_early=True
    )
    if cache is not None and len(nodes) != 1:
        raise ValueError(f"a PrefixCache resumes at one recorded node, got {len(nodes)}")
    for i, batch in enumerate(calib_batches(calib, batch_size, progress, desc)):
        values.clear()
        if cache is None:
            runner.forward(batch)
        else:
            cache.advance(runner, i, batch, nodes[0])
        yield dict(values)


class PrefixCache:
    """The live values of each calibration batch at one cut of the graph, to resume the forward from.

    After :func:`stream_activations` recorded node ``A`` of batch ``i``, the cache holds every value
    computed up to ``A`` that a node after ``A`` reads (the residual stream, rotary tables, masks...).
    The next collection at a later node ``B`` runs only the nodes between ``A`` and ``B``, even if the
    graph was edited in between *after* ``A`` (the ``fff`` pass swaps layer ``k``'s FFN, then collects
    layer ``k+1``'s inputs through the new op). When an edit touched the prefix (a node up to ``A``
    unknown to the cache, or a value read after ``A`` not saved) the batch runs from the inputs again,
    so the values are always those of a full forward.

    Example:
        >>> cache = PrefixCache()
        >>> # for acts in stream_activations(program, [node], calib, cache=cache): ...
    """

    def __init__(self) -> None:
        # batch index -> (cut node, node names up to and including it, {node name: live value})
        self.batches: dict[int, tuple[str, frozenset[str], dict[str, torch.Tensor]]] = {}
        self.resumed = 0  # batches that resumed from a saved cut (tests and logs)

    def clear(self) -> None:
        """Drops every saved value."""
        self.batches.clear()

    def _initial_env(self, gm: fx.GraphModule, i: int) -> dict[fx.Node, Any] | None:
        if i not in self.batches:
            return None
        cut, prefix, saved = self.batches[i]
        env: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                continue  # weights are read again (an edit may add some anywhere in the graph)
            if node.name not in prefix:
                return None  # new computation before the cut (dead nodes may have been dropped: fine)
            # Dead values of the prefix are marked done (None): the interpreter skips nodes in its env.
            env[node] = saved.get(node.name)
            if node.name == cut:
                break
        else:
            return None  # the cut is gone
        for node, value in env.items():
            if value is None and any(u not in env for u in node.users):
                return None  # a value read after the cut was not saved
        return env

    def advance(self, runner: GraphRunner, i: int, batch: torch.Tensor, node: str) -> None:
        """Runs batch ``i`` up to ``node`` (resuming from its saved cut when possible), then cuts there."""
        gm = runner.module
        env = self._initial_env(gm, i)
        if env is not None and any(n.name == node for n in env):
            env = None  # asked for a node at or before the saved cut: run from the inputs
        self.batches.pop(i, None)  # the old cut's values are not needed past this point
        runner.forward(batch, initial_env=env)
        self.resumed += env is not None
        names: list[str] = []
        for n in gm.graph.nodes:
            if n.op != "get_attr":  # not saved: holding weights would keep replaced ones alive
                names.append(n.name)
            if n.name == node:
                break
        prefix = frozenset(names)
        live = {
            n.name: value
            for n, value in runner.env.items()
            if value is not None and n.name in prefix and any(u.name not in prefix for u in n.users)
        }
        runner.env = {}
        self.batches[i] = (node, prefix, live)
