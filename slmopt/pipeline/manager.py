"""The PassContext and the PassManager that runs a Pipeline on a Program.

Example:
    >>> # program = capture(...); ctx = PassContext(calib=tokens)
    >>> # new_program, reports = PassManager(parse_pipeline("mask-2to4")).run(program, ctx)
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmopt.errors import PassError, UserError
from slmopt.memory import release_freed_memory
from slmopt.pipeline.parse import Pipeline
from slmopt.pipeline.pass_base import Pass, PassReport

if typing.TYPE_CHECKING:
    from slmopt.data.windows import EvalData
    from slmopt.pipeline.instruments import Instrument
    from slmopt.program import Program

__all__ = ["PassContext", "PassManager"]

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """Runtime state shared by the passes of one run (never stored in configs or globals).

    Attributes:
        calib: calibration inputs (token ids ``[n, seq]`` or model inputs), or None.
        seed: seed for every random choice a pass makes.
        device: torch device for calibration/distillation work.
        threads: torch intra-op threads.
        backend: the target backend name (passes may choose a lowering for it).
        progress: show progress bars.
        reference: the untouched input Program (for distillation and parity).
        instruments: hooks run around every pass (``--dump-graph``, ``--time-passes``, ``--verify-each``).
        eval_tokens: held-out token windows (``EvalData``, which also knows bytes per token, or a plain
            ``[n, seq]`` tensor) for passes that report quality before/after; None without ``--eval``.
        tokenizer: the model's Hugging Face tokenizer, if it has one.
        artifact_dir: the run's output (staging) folder, for passes that write files such as charts;
            None when nothing is written.
    """

    calib: torch.Tensor | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    backend: str = "onnxruntime"
    progress: bool = True
    reference: Program | None = None
    instruments: list[Instrument] = field(default_factory=list)
    eval_tokens: EvalData | torch.Tensor | None = None
    tokenizer: Any = None
    artifact_dir: Path | None = None

    def require_calib(self, pass_name: str, min_samples: int = 1) -> torch.Tensor:
        if self.calib is None or len(self.calib) < min_samples:
            raise ValueError(f"pass {pass_name!r} needs calibration data: pass --calib FILE")
        return self.calib

    def sample_inputs(self, program: Program, n: int = 2) -> tuple[torch.Tensor, ...]:
        """Inputs for verification: a few calibration rows, else the program's example inputs."""
        if self.calib is not None and len(program.example_inputs) == 1:
            return (self.calib[:n],)
        return program.example_inputs


class PassManager:
    """Runs a Pipeline on a copy of a Program: requires → call → ensures per pass, with instruments.

    Example:
        >>> # program = capture(...); ctx = PassContext(calib=tokens)
        >>> # new_program, reports = PassManager(parse_pipeline("mask-2to4")).run(program, ctx)
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        # Fan-out results: {variant name: (program, reports of the passes after the fan-out)}.
        self.variants: dict[str, tuple[Program, list[PassReport]]] = {}
        self.fanned_out: Pass | None = None  # the pass whose result fanned out, if any

    def run(
        self, program: Program, ctx: PassContext, in_place: bool = False
    ) -> tuple[Program, list[PassReport]]:
        """Runs every pass; a pass returning ``variants`` fans out (see :attr:`variants`).

        After a fan-out the remaining passes run on each variant (with the same context, minus the
        instruments, whose files would collide) and ``run`` returns the fanning pass's own program.
        ``in_place=True`` rewrites ``program`` itself instead of a copy (no reference model is kept):
        for callers that own the Program and compare nothing against the original, it halves peak memory.
        """
        self.variants = {}
        self.fanned_out = None
        work = program if in_place else program.clone()
        if ctx.reference is None and not in_place:
            ctx.reference = program
        reports: list[PassReport] = []
        done: list[str] = []
        for index, p in enumerate(self.pipeline.passes):
            for inst in ctx.instruments:
                inst.before_pass(p, work, ctx, index)
            started = time.perf_counter()
            try:
                p.requires(work, ctx)
                result = p.call(work, ctx)
                p.ensures(result.program, ctx)
            except (ValueError, TypeError) as err:
                # A pass that cannot apply to this model/data is a user-facing problem, not a crash.
                raise UserError(f"pass {p.name!r}: {err}") from err
            except Exception as err:  # noqa: BLE001 - wrapped with context and chained
                raise PassError(p.name, done, err) from err
            work, report = result.program, result.report
            if not report.seconds:
                report.seconds = time.perf_counter() - started
            for inst in ctx.instruments:
                inst.after_pass(p, work, report, ctx, index)
            for warning in report.warnings:
                log.warning(warning)
            work.history.append(report.to_dict())
            reports.append(report)
            release_freed_memory()  # what this pass freed, before the next one allocates
            done.append(p.name)
            if result.variants:
                self.fanned_out = p
                self._fan_out(result.variants, report, index, ctx)
                break
        return work, reports

    def _fan_out(
        self, variants: dict[str, Program], report: PassReport, index: int, ctx: PassContext
    ) -> None:
        rest = Pipeline(self.pipeline.passes[index + 1 :])
        quiet = dataclasses.replace(ctx, instruments=[])
        for name, variant in variants.items():
            variant.history.append(report.to_dict())
            log.info("variant %s: running %s", name, str(rest) or "(no further passes)")
            self.variants[name] = PassManager(rest).run(variant, quiet) if rest.passes else (variant, [])
