"""``distill``: recover quality after any pass by distilling from the original model on calibration data.

Teacher: the untouched input Program (``ctx.reference``); student: the current Program's float
parameters (parameters read by custom ``slmopt::`` ops have no autograd and stay frozen, noted in the
report). Modes:

* ``logits``: KL(teacher ‖ student) of the next-token distributions (MSE of the outputs for encoders);
* ``local``: MSE between teacher and student block outputs (plus the output), only where blocks
  correspond one to one (same block count, e.g. after width cuts); otherwise use ``logits``.

Weights with at least 25 % exact zeros keep them (2:4 masks survive). Adam on calibration batches
taken in order (cycling), at most ``steps`` steps and ``seconds`` seconds:
the result is deterministic for a given seed whenever ``seconds`` is not the binding limit. Gradients are
averaged over ranks (one flat all-reduce, divided by the world size) and the time budget is decided on
rank 0, so a distributed run takes identical steps.

Example:
    >>> from slmopt.pipeline import parse_pipeline
    >>> str(parse_pipeline("distill{steps=50}")).startswith("distill{mode=logits,steps=50")
    True
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from slmopt.analysis.analyze import analyze
from slmopt.distributed import rank0_decides, shard_rows, sum_gradients, world_size
from slmopt.passes.importance import units_of
from slmopt.pipeline.pass_base import Change, Pass, PassResult, register_pass
from slmopt.program import unwrap_output

if TYPE_CHECKING:
    from slmopt.pipeline.manager import PassContext
    from slmopt.program import Program

__all__ = ["Distill", "average_gradients"]

ZERO_SHARE = 0.25  # a weight with at least this share of exact zeros is treated as masked


class _Recorder(fx.Interpreter):
    """Runs a graph with autograd on, keeping the values of ``record`` nodes."""

    def __init__(self, gm: fx.GraphModule, record: list[str]) -> None:
        super().__init__(gm)
        self.record, self.values = set(record), {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.record:
            self.values[n.name] = out
        return out


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """DDP-style gradient averaging across ranks in one flat collective (identity in one process)."""
    if world_size() == 1:
        return
    sum_gradients(params)
    for p in params:
        if p.grad is not None:
            p.grad.div_(world_size())


def _frozen_targets(program: Program) -> set[str]:
    """Parameters read by custom slmopt ops (no autograd formula)."""
    frozen = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "slmopt":
            frozen |= {a.target for a in node.all_input_nodes if a.op == "get_attr"}
    return frozen


@register_pass("distill")
class Distill(Pass):
    """Distils the current program toward the original one (logits or block-local).

    Example:
        >>> Distill(Distill.Config(mode="local", steps=10)).options_string().startswith("distill{mode=local")
        True
    """

    needs_original = True  # the teacher is ctx.reference: the pipeline must keep the untouched input

    @dataclass(frozen=True)
    class Config:
        mode: Literal["logits", "local"] = field(default="logits", metadata={"help": "logits|local"})
        steps: int = field(default=100, metadata={"help": "maximum optimiser steps"})
        seconds: float | None = field(
            default=None,
            metadata={
                "help": "time budget in seconds; none = steps only (a binding time budget is not deterministic)"
            },
        )
        lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
        batch: int = field(default=8, metadata={"help": "calibration rows per step"})
        temperature: float = field(default=1.0, metadata={"help": "softmax temperature (logits mode)"})

        def __post_init__(self) -> None:
            checks = [
                (self.steps < 1, f"steps must be >= 1, got {self.steps}"),
                (self.seconds is not None and self.seconds <= 0, f"seconds must be > 0, got {self.seconds}"),
                (self.lr <= 0, f"lr must be > 0, got {self.lr}"),
                (self.batch < 1, f"batch must be >= 1, got {self.batch}"),
                (self.temperature <= 0, f"temperature must be > 0, got {self.temperature}"),
            ]
            for message in (m for bad, m in checks if bad):
                raise ValueError(message)

    def requires(self, program: Program, ctx: PassContext) -> None:
        ctx.require_calib(self.name)
        if ctx.reference is None:
            raise ValueError("distill needs the original model as teacher (ctx.reference)")
        if self.config.mode == "local":
            self._pairs(program, ctx.reference)

    def _pairs(self, student: Program, teacher: Program) -> list[tuple[str, str]]:
        """(teacher node, student node) of corresponding block outputs; ValueError when blocks differ."""
        t_units, s_units = units_of(analyze(teacher), "block"), units_of(analyze(student), "block")
        if len(t_units) != len(s_units):
            raise ValueError(
                f"mode=local needs corresponding blocks: teacher has {len(t_units)}, student {len(s_units)} "
                "(blocks were removed); use mode=logits"
            )
        return [(t.x_out(), s.x_out()) for t, s in zip(t_units, s_units, strict=True)]

    def _loss(self, t_out, s_out, t_vals, s_vals, pairs, causal: bool) -> torch.Tensor:
        if self.config.mode == "local":
            loss = sum(F.mse_loss(s_vals[s], t_vals[t]) for t, s in pairs)
            return loss + F.mse_loss(s_out, t_out)
        if not causal:
            return F.mse_loss(s_out, t_out)
        tau = self.config.temperature
        log_q = F.log_softmax(s_out / tau, dim=-1).flatten(0, -2)
        log_p = F.log_softmax(t_out / tau, dim=-1).flatten(0, -2)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * tau * tau

    def call(self, program: Program, ctx: PassContext) -> PassResult:
        started, cfg = time.perf_counter(), self.config
        report = self.new_report(program)
        teacher = ctx.reference
        assert teacher is not None
        pairs = self._pairs(program, teacher) if cfg.mode == "local" else []
        causal = program.info.kind == "causal-lm"
        frozen = _frozen_targets(program)
        named = dict(program.graph_module.named_parameters())
        params = [p for n, p in named.items() if p.is_floating_point() and n not in frozen]
        calib = shard_rows(ctx.require_calib(self.name))
        batches = list(calib.split(cfg.batch))
        t_rec = _Recorder(teacher.graph_module, [t for t, _ in pairs])
        s_rec = _Recorder(program.graph_module, [s for _, s in pairs])
        targets = []
        with torch.no_grad():
            for b in batches:  # teacher outputs are fixed: compute once
                out = unwrap_output(t_rec.run(b))
                targets.append((out, dict(t_rec.values)))

        def loss_on(i: int) -> torch.Tensor:
            # Without block pairs the compiled forward is enough (much faster than interpreting).
            s_out = unwrap_output(s_rec.run(batches[i]) if pairs else program.graph_module(batches[i]))
            return self._loss(targets[i][0], s_out, targets[i][1], s_rec.values, pairs, causal)

        with torch.no_grad():
            before = float(sum(loss_on(i) for i in range(len(batches))) / len(batches))
        torch.manual_seed(ctx.seed)
        # Weights that are mostly exact zeros (2:4 masks, pruned rows) keep their zeros: a recovery pass
        # must not undo the sparsity an earlier pass created.
        zeros = {id(p): p == 0 for p in params if p.dim() >= 2 and (p == 0).float().mean() >= ZERO_SHARE}
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        steps = 0
        try:
            bar = tqdm(total=cfg.steps, desc=f"distill ({cfg.mode})", disable=not ctx.progress, leave=False)
            for i in itertools.islice(itertools.cycle(range(len(batches))), cfg.steps):
                # Rank 0 decides: ranks checking their own clocks would stop at different steps.
                if cfg.seconds is not None and rank0_decides(time.perf_counter() - started > cfg.seconds):
                    report.warnings.append(
                        f"distill: time budget {cfg.seconds:g}s reached after {steps} steps"
                    )
                    break
                opt.zero_grad(set_to_none=True)
                loss = loss_on(i)
                loss.backward()
                average_gradients(params)
                opt.step()
                with torch.no_grad():
                    for p in params:
                        if id(p) in zeros:
                            p.masked_fill_(zeros[id(p)], 0.0)
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4g}")
            bar.close()
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        with torch.no_grad():
            after = float(sum(loss_on(i) for i in range(len(batches))) / len(batches))
        report.changes.append(Change("distill", "parameters", {"tensors": len(params), "steps": steps}))
        report.metrics.update(
            mode=cfg.mode, loss_before=before, loss_after=after, steps=steps, trained_tensors=len(params),
            frozen_custom_op_params=sorted(frozen), rows=len(calib), zero_masks_kept=len(zeros),
        )  # fmt: skip
        return PassResult(program, self.finish_report(report, program, started))
