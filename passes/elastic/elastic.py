"""``elastic``: reorder heads/neurons by importance, then extract one smaller dense subnet per budget.

The pass returns the *reordered* full model (function-preserving: every prefix of heads/neurons is a valid
smaller network) and, as fan-out ``variants``, one sliced Program per budget; the PassManager runs the rest
of the pipeline on each (``elastic{budgets=0.5,0.75},distill`` distills every subnet).

Budgets are fractions of the model's **total** parameters, token embedding and LM head included (they do
not shrink with head/FFN/depth cuts, so small budgets may be infeasible: the error names the smallest
feasible fraction). ``latency=`` budgets are milliseconds per token on the target backend, measured at
batch 1 on an 8-token input (median call time / 8).

Search per budget: a small grid (depth by block importance × head-group ratio, FFN width filled to the
budget) scored by calibration loss with masked weights, then ``refine`` greedy rounds moving one KV group
per block, then the FFN widths are topped up neuron by neuron until the budget is met.

Example:
    >>> from slmopt.pipeline import parse_pipeline
    >>> str(parse_pipeline("elastic{budgets=0.5,0.75}")).startswith("elastic{budgets=0.5,0.75")
    True
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slmopt.analysis.analyze import analyze
from slmopt.analysis.coverage import check_coverage
from slmopt.analysis.structure import Structure
from slmopt.passes.elastic.latency import feasible_latency_plan
from slmopt.passes.elastic.plan import (
    Orders,
    Plan,
    PlanScorer,
    cost,
    random_orders,
    score_orders,
    uniform_plan,
)
from slmopt.passes.elastic.report import subnet_row, write_pareto
from slmopt.passes.elastic.surgery import attention_layouts, extract, reorder
from slmopt.passes.importance import units_of
from slmopt.pipeline.pass_base import Change, Pass, PassResult, register_pass

if TYPE_CHECKING:
    from slmopt.pipeline.manager import PassContext
    from slmopt.program import Program

__all__ = ["Elastic", "load_replay", "variant_name"]

log = logging.getLogger(__name__)
DEFAULT_BUDGETS = (0.5, 0.75)  # neither budgets= nor latency= given
TOLERANCE = 0.03  # a subnet's parameters land in [(1 - TOLERANCE) · target, target]


def variant_name(budget: float, kind: str = "params") -> str:
    """``0.5`` -> ``"0.5"``; latency budgets get an ``ms`` suffix (``"2ms"``)."""
    return f"{budget:g}" + ("ms" if kind == "latency" else "")


def load_replay(path: str | Path) -> dict[str, Any]:
    """The elastic metrics (orders + plans) of a previous run's ``report.json`` (top-level or subnet)."""
    try:
        report = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read replay report {path}: {err}") from None
    for entry in report.get("passes", []):
        if entry.get("name") == "elastic" and "plans" in entry.get("metrics", {}):
            return entry["metrics"]
    raise ValueError(f"{path} holds no elastic pass decisions (was it written by an elastic compile?)")


@register_pass("elastic", aliases=("subnets",))
class Elastic(Pass):
    """Importance reorder + subnet extraction, one Program per budget (fan-out).

    Example:
        >>> Elastic(Elastic.Config(budgets=(0.5,))).options_string().startswith("elastic{")
        True
    """

    @dataclass(frozen=True)
    class Config:
        budgets: tuple[float, ...] = field(
            default=(),
            metadata={
                "help": "fractions of total parameters (embeddings included), in (0, 1]; default 0.5,0.75"
            },
        )
        latency: tuple[float, ...] = field(
            default=(), metadata={"help": "ms per token on the target backend (batch 1, 8 tokens)"}
        )
        order: Literal["importance", "random"] = field(
            default="importance", metadata={"help": "importance|random (random: a baseline)"}
        )
        head_ratios: tuple[float, ...] = field(
            default=(1.0, 0.75, 0.5, 0.25), metadata={"help": "grid of KV-group ratios tried per depth"}
        )
        refine: int = field(default=2, metadata={"help": "greedy refinement rounds after the grid"})
        samples: int = field(default=64, metadata={"help": "calibration rows for importance"})
        score_samples: int = field(default=16, metadata={"help": "calibration rows to score candidates"})
        protect: tuple[int, ...] = field(default=(0,), metadata={"help": "blocks never dropped"})
        replay: str = field(default="", metadata={"help": "report.json of an earlier run: reuse its plans"})

        def __post_init__(self) -> None:
            checks = [
                (any(not 0 < b <= 1 for b in self.budgets), f"budgets must be in (0, 1], got {self.budgets}"),
                (any(t <= 0 for t in self.latency), f"latency must be > 0 ms, got {self.latency}"),
                (any(not 0 < r <= 1 for r in self.head_ratios), "head_ratios must be in (0, 1]"),
                (self.refine < 0 or self.samples < 1 or self.score_samples < 1, "refine >= 0, samples >= 1"),
            ]
            for message in (m for bad, m in checks if bad):
                raise ValueError(message)

    replay_option = "replay"  # `--replay REPORT` sets this Config field

    def variant_row(
        self, name: str, folder: Path, report: Any, metrics: dict[str, Any], options: Any
    ) -> dict[str, Any]:
        """The subnet's row: size, FLOPs, measured latency on the target backend, quality (see ``report``)."""
        return subnet_row(name, folder, report, metrics, options)

    def write_variant_summary(self, rows: list[dict[str, Any]], folder: Path) -> dict[str, str]:
        """``pareto.png`` (quality vs latency) when the subnets have held-out quality."""
        pareto = write_pareto(rows, folder)
        return {"pareto": pareto} if pareto else {}

    def requires(self, program: Program, ctx: PassContext) -> None:
        if not self.config.replay:
            ctx.require_calib(self.name)
        structure = analyze(program)
        if not structure.blocks:
            raise ValueError("no transformer blocks found (see `slmopt inspect`)")
        attention_layouts(structure)  # raises for layouts elastic cannot cut

    # -- search ---------------------------------------------------------------------------------------
    def _fill(self, program, structure, plan: Plan, target: float, total: int) -> Plan:
        """Tops up FFN widths round robin (one neuron per block per round) while the plan fits."""
        widths = {b.index: b.ffn.width for b in structure.blocks if b.ffn is not None}
        grown = True
        while grown:
            grown = False
            for b in plan.blocks:
                if b in plan.ffn and plan.ffn[b] < widths[b]:
                    plan.ffn[b] += 1
                    if cost(program, structure, plan, total)["params"] > target:
                        plan.ffn[b] -= 1
                    else:
                        grown = True
        return plan

    def _fit(self, program, structure, plan: Plan, target: float, total: int) -> Plan | None:
        """``plan`` with FFN widths set to fit ``target`` (None when even 1 neuron per block is too big)."""
        for b in plan.ffn:
            plan.ffn[b] = 1
        if cost(program, structure, plan, total)["params"] > target:
            return None
        per = cost(program, structure, Plan(plan.blocks, plan.groups, {b: 2 for b in plan.ffn}), total)
        step = per["params"] - cost(program, structure, plan, total)["params"]  # params of one neuron/block
        room = int((target - cost(program, structure, plan, total)["params"]) // max(step, 1))
        widths = {b.index: b.ffn.width for b in structure.blocks if b.ffn is not None}
        for b in plan.ffn:
            plan.ffn[b] = min(widths[b], 1 + room)
        return self._fill(program, structure, plan, target, total)

    def _ranked_blocks(self, orders: Orders) -> list[int]:
        protect = [b for b in self.config.protect if b in orders.block_scores]
        rest = sorted(
            (b for b in orders.block_scores if b not in protect), key=lambda b: -orders.block_scores[b]
        )
        return protect + rest

    def _smallest(self, program, structure, orders: Orders, total: int) -> Plan:
        keep = self._ranked_blocks(orders)[:1]
        return Plan(
            keep, {b: 1 for b in keep if b in orders.groups}, {b: 1 for b in keep if b in orders.neurons}
        )

    def search(self, program, structure, orders, scorer, target: float, total: int) -> tuple[Plan, list]:
        """Grid over (depth, head ratio) + greedy group moves; returns the best plan and the tried rows."""
        ranked, tried = self._ranked_blocks(orders), []
        candidates = []
        for depth in range(len(ranked), 0, -1):
            for ratio in self.config.head_ratios:
                plan = uniform_plan(structure, ranked[:depth], ratio, 1)
                fitted = self._fit(program, structure, plan, target, total)
                if fitted is not None and not any(c.key() == fitted.key() for c in candidates):
                    candidates.append(fitted)
        if not candidates:
            return None, tried
        full = [
            c for c in candidates if cost(program, structure, c, total)["params"] >= (1 - TOLERANCE) * target
        ]
        best, best_loss = None, float("inf")
        for plan in full or candidates:
            loss = scorer.loss(plan)
            tried.append({"plan": plan.to_dict(), "loss": loss, "stage": "grid"})
            if loss < best_loss:
                best, best_loss = plan, loss
        layouts = {lay.block: lay for lay in attention_layouts(structure)}
        for _ in range(self.config.refine):
            moves = []
            for b in best.blocks:
                for delta in (-1, 1):
                    g = best.groups.get(b, 0) + delta
                    if b in layouts and 1 <= g <= layouts[b].kv_heads:
                        plan = Plan(list(best.blocks), best.groups | {b: g}, dict(best.ffn))
                        fitted = self._fit(program, structure, plan, target, total)
                        if fitted is not None:
                            moves.append(fitted)
            scored = [(scorer.loss(m), m) for m in moves]
            tried += [{"plan": m.to_dict(), "loss": loss, "stage": "refine"} for loss, m in scored]
            improved = [(loss, m) for loss, m in scored if loss < best_loss]
            if not improved:
                break
            best_loss, best = min(improved, key=lambda lm: lm[0])
        return best, tried

    # -- running --------------------------------------------------------------------------------------
    def call(self, program: Program, ctx: PassContext) -> PassResult:
        started, cfg = time.perf_counter(), self.config
        program.recompile()  # drop dead weights (e.g. BERT's unused pooler) so totals count live params
        report = self.new_report(program)
        structure = analyze(program)
        coverage = check_coverage(structure, self.name, narrowed=False)  # elastic cuts every block
        total = program.num_params()
        replay = load_replay(cfg.replay) if cfg.replay else None
        if replay is not None:
            orders = Orders.from_dict(replay["orders"])
        else:
            calib = ctx.require_calib(self.name)[: cfg.samples]
            scored = score_orders(program, structure, calib, ctx.progress)
            orders = scored if cfg.order == "importance" else random_orders(structure, ctx.seed)
        reorder(program, structure, orders)
        report.changes.append(Change("reorder", "model", {"order": cfg.order}))
        structure = analyze(program)
        plans: dict[str, Plan] = {}
        rows: dict[str, Any] = {}
        if replay is not None:
            plans = {name: Plan.from_dict(p) for name, p in replay["plans"].items()}
        else:
            calib = ctx.require_calib(self.name)
            # Every rank scores the same rows (not its shard): the search must pick the same plan everywhere.
            scorer = PlanScorer(program, structure, calib[: cfg.score_samples])
            for budget in cfg.budgets or (DEFAULT_BUDGETS if not cfg.latency else ()):
                name = variant_name(budget)
                if budget >= 1.0:
                    plans[name] = uniform_plan(structure, sorted(orders.block_scores), 1.0, 1 << 30)
                    continue
                plans[name], rows[name] = self._plan_budget(program, structure, orders, scorer, budget, total)
            for ms in cfg.latency:
                plan, info = feasible_latency_plan(self, program, structure, orders, scorer, ms, total, ctx)
                plans[variant_name(ms, "latency")], rows[variant_name(ms, "latency")] = plan, info
        variants: dict[str, Program] = {}
        subnets = {}
        for name, plan in plans.items():
            sub = program.clone()
            patched = extract(sub, structure, plan) if plan.key() != self._full(structure).key() else 0
            variants[name] = sub
            self._check_budget(name, sub.num_params() / total)
            c = cost(program, structure, plan, total)
            subnets[name] = {
                "params": sub.num_params(), "fraction": sub.num_params() / total, "predicted": c["params"],
                "flops_per_token": c["flops_per_token"], "blocks": plan.blocks,
                "kv_groups": plan.groups, "ffn": plan.ffn, "shape_constants_patched": patched,
                "calib_loss": rows.get(name, {}).get("loss") if isinstance(rows.get(name), dict) else None,
                "quality": self._quality(sub, ctx),
            }  # fmt: skip
            report.changes.append(Change("extract", f"subnet-{name}", {"plan": plan.to_dict()}))
        report.metrics.update(
            total_params=total, coverage=coverage,
            flops_full=cost(program, structure, self._full(structure), total)["flops_per_token"],
            quality_full=self._quality(program, ctx), subnets=subnets, orders=orders.to_dict(),
            plans={n: p.to_dict() for n, p in plans.items()}, search=rows,
        )  # fmt: skip
        result = PassResult(program, self.finish_report(report, program, started))
        result.variants = variants
        return result

    def _check_budget(self, name: str, fraction: float) -> None:
        """A parameter subnet must land within ±TOLERANCE of its budget: a miss is an error, not a note
        (weights a cut failed to remove, e.g. kept alive by a stray graph node, would otherwise pass)."""
        budget = next((b for b in self.config.budgets if variant_name(b) == name), None)
        if budget is None or budget >= 1.0 or abs(fraction - budget) <= TOLERANCE * budget:
            return
        raise ValueError(
            f"subnet {name} kept {fraction:.3f} of the parameters, outside ±{TOLERANCE:.0%} of its budget "
            f"{budget:g}; `slmopt inspect MODEL` shows which weights analysis could not place"
        )

    def _full(self, structure: Structure) -> Plan:
        return uniform_plan(structure, [b.index for b in structure.blocks], 1.0, 1 << 30)

    def _plan_budget(
        self, program, structure, orders, scorer, budget: float, total: int
    ) -> tuple[Plan, dict]:
        target = budget * total
        smallest = self._smallest(program, structure, orders, total)
        least = cost(program, structure, smallest, total)["params"]
        if least > target:
            raise ValueError(
                f"budget {budget:g} ({int(target):,} of {total:,} parameters) cannot be met: the smallest "
                f"feasible subnet is {least / total:.3f} ({least:,} parameters: 1 block, 1 KV group, 1 FFN "
                "neuron; embeddings and LM head count and cannot shrink)"
            )
        plan, tried = self.search(program, structure, orders, scorer, target, total)
        if plan is None:  # no grid point fits (coarse head ratios): the smallest subnet, topped up
            plan = self._fit(program, structure, smallest, target, total) or smallest
        loss = scorer.loss(plan)
        log.info("elastic %.3g: %s (calibration loss %.4f, %d candidates)", budget, plan, loss, len(tried))
        return plan, {"loss": loss, "candidates": tried}

    def _quality(self, program: Program, ctx: PassContext) -> dict[str, Any] | None:
        """Held-out quality of a (sub)program when eval tokens are available (causal LMs only)."""
        given = ctx.eval_tokens
        tokens = getattr(given, "tokens", given)
        if tokens is None or program.info.kind != "causal-lm":
            return None
        from slmopt.data.metrics import cross_entropy_nats, predicted_tokens, summarize_quality

        bpt = getattr(given, "bytes_per_token", None)
        nats = cross_entropy_nats(program, tokens, progress=False)
        return summarize_quality(nats, predicted_tokens(tokens), bpt, program.info.byte_level)

    def ensures(self, program: Program, ctx: PassContext) -> None:
        if not units_of(analyze(program), "block"):
            raise AssertionError("the reordered model lost its blocks")
