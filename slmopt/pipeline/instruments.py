"""PassManager instruments: cross-cutting work around every pass (``--dump-graph``, ``--time-passes``,
``--verify-each``).

Example:
    >>> timer = TimePasses()
    >>> timer.table().splitlines()[0]
    'pass             time     share'
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from slmopt.pipeline.manager import PassContext
    from slmopt.pipeline.pass_base import Pass, PassReport
    from slmopt.program import Program

__all__ = ["DumpGraph", "Instrument", "TimePasses", "VerifyEach"]

log = logging.getLogger(__name__)


class Instrument(Protocol):
    def before_pass(self, p: Pass, program: Program, ctx: PassContext, index: int) -> None: ...

    def after_pass(
        self, p: Pass, program: Program, report: PassReport, ctx: PassContext, index: int
    ) -> None: ...


class DumpGraph:
    """``--dump-graph DIR``: writes each pass's input and output graph as readable text."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _write(self, program: Program, stem: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{stem}.txt").write_text(str(program.graph))
        (self.directory / f"{stem}.py").write_text(program.graph_module.code)

    def before_pass(self, p: Pass, program: Program, ctx: PassContext, index: int) -> None:
        if index == 0:
            self._write(program, "00-input")

    def after_pass(self, p: Pass, program: Program, report: PassReport, ctx: PassContext, index: int) -> None:
        self._write(program, f"{index + 1:02d}-{p.name}")


class TimePasses:
    """``--time-passes``: collects each pass's wall time and logs a table at the end."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, p: Pass, program: Program, ctx: PassContext, index: int) -> None:
        self._start = time.perf_counter()

    def after_pass(self, p: Pass, program: Program, report: PassReport, ctx: PassContext, index: int) -> None:
        self.times.append((p.name, time.perf_counter() - self._start))

    def table(self) -> str:
        total = sum(t for _, t in self.times) or 1.0
        rows = [f"{name:<16} {t:8.2f}s {100 * t / total:5.1f}%" for name, t in self.times]
        return "\n".join(["pass             time     share", *rows])


class VerifyEach:
    """``--verify-each``: runs sample inputs before/after each pass and records the max-abs difference."""

    def __init__(self) -> None:
        self._before: torch.Tensor | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()

    def before_pass(self, p: Pass, program: Program, ctx: PassContext, index: int) -> None:
        self._inputs = ctx.sample_inputs(program)
        self._before = program(*self._inputs)

    def after_pass(self, p: Pass, program: Program, report: PassReport, ctx: PassContext, index: int) -> None:
        after = program(*self._inputs)
        assert self._before is not None
        diff = (after.float() - self._before.float()).abs().max().item()
        report.metrics["verify_max_abs_diff"] = diff
        log.info("verify-each: %s max |diff| = %.3g", p.name, diff)
