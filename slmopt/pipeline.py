"""Pipeline strings, the PassContext, the PassManager and its instruments.

Pipeline strings follow MLIR's shape: ``name{key=value,...}`` items separated by commas. A token inside
braces without ``=`` continues the previous option's list value, so ``prune-attn{layers=1,3,keep=0.5}``
sets ``layers=(1, 3)``. Parsing happens before any model is loaded and fails with a ValueError naming the
valid choices. ``str(parse_pipeline(s))`` is the canonical form with every option resolved.

Example:
    >>> from slmopt.pass_base import Pass, PassResult, register_pass
    >>> from dataclasses import dataclass, field
    >>> @register_pass("demo-scale")
    ... class DemoScale(Pass):
    ...     @dataclass(frozen=True)
    ...     class Config:
    ...         factor: float = field(default=2.0, metadata={"help": "multiplier"})
    ...         layers: tuple[int, ...] = field(default=(), metadata={"help": "which layers"})
    ...     def call(self, program, ctx):
    ...         return PassResult(program, self.new_report(program))
    >>> str(parse_pipeline("demo-scale{layers=1,3}"))
    'demo-scale{factor=2.0,layers=1,3}'
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from slmopt.errors import PassError, UserError
from slmopt.memory import release_freed_memory
from slmopt.pass_base import Pass, PassReport, get_pass_class

if typing.TYPE_CHECKING:
    from slmopt.program import Program

__all__ = [
    "DumpGraph",
    "Instrument",
    "PassContext",
    "PassManager",
    "Pipeline",
    "TimePasses",
    "VerifyEach",
    "format_options",
    "format_value",
    "parse_pipeline",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- parsing
def _split_top(text: str, seps: str) -> list[str]:
    """Splits on any char of ``seps`` outside braces/brackets; empty pieces dropped."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced '{ch}' in pipeline {text!r}")
        if ch in seps and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced braces in pipeline {text!r}")
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"list of {_describe_type(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _convert(raw: str, tp: Any, where: str) -> Any:
    """Converts one option string to the field's declared type (rule table by type origin)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(raw, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[-1] if errors else f"{where}: bad value {raw!r}")
    if origin is Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ValueError(f"{where}: {raw!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        inner = args[0] if args else str
        text = raw.strip("[]()")
        items = [] if not text else [s.strip() for s in text.split(",") if s.strip()]
        return tuple(_convert(s, inner, where) for s in items)
    if tp is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: {raw!r} is not a boolean (true/false)")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise ValueError(f"{where}: {raw!r} is not a valid {tp.__name__}") from None
    if tp is str:
        return raw
    raise ValueError(f"{where}: unsupported option type {tp!r}")


def format_value(value: Any) -> str:
    """An option value as a pipeline string spells it (lists comma separated, ``true``, ``none``)."""
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return str(value)


def format_options(config: Any) -> str:
    """``{k=v,...}`` for a config dataclass; empty string when it has no options."""
    items = [f"{f.name}={format_value(getattr(config, f.name))}" for f in dataclasses.fields(config)]
    return "{" + ",".join(items) + "}" if items else ""


def build_config(pass_cls: type[Pass], raw: dict[str, str]) -> Any:
    """Instantiates ``pass_cls.Config`` from raw strings, with errors naming the valid choices."""
    cfg_cls = pass_cls.Config
    hints = typing.get_type_hints(cfg_cls)
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in valid:
            choices = ", ".join(sorted(valid)) or "(none)"
            raise ValueError(f"pass {pass_cls.name!r} has no option {key!r}; valid options: {choices}")
        values[key] = _convert(text, hints[key], f"{pass_cls.name}.{key}")
    try:
        return cfg_cls(**values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"pass {pass_cls.name!r}: {err}") from None


def _parse_options(body: str, pass_name: str) -> dict[str, str]:
    raw: dict[str, str] = {}
    last: str | None = None
    for token in _split_top(body, ", \t\n"):
        if "=" in token:
            key, value = (s.strip() for s in token.split("=", 1))
            if not key:
                raise ValueError(f"pass {pass_name!r}: empty option name in {body!r}")
            if key in raw:
                raise ValueError(f"pass {pass_name!r}: option {key!r} given twice")
            raw[key], last = value, key
        elif last is not None:  # continuation of a list value: layers=1,3
            raw[last] = f"{raw[last]},{token}"
        else:
            raise ValueError(f"pass {pass_name!r}: expected key=value, got {token!r}")
    return raw


@dataclass
class Pipeline:
    """An ordered list of configured passes."""

    passes: list[Pass] = field(default_factory=list)

    def __str__(self) -> str:
        return ",".join(p.options_string() for p in self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]


def parse_pipeline(text: str) -> Pipeline:
    """Parses ``"mask-2to4{method=wanda},fff{depth=3}"`` into a validated Pipeline."""
    if not text or not text.strip():
        raise ValueError("empty pipeline: give at least one pass (see `slmopt list-passes`)")
    passes: list[Pass] = []
    for item in _split_top(text, ","):
        name, _, rest = item.partition("{")
        name = name.strip()
        if rest and not rest.endswith("}"):
            raise ValueError(f"malformed pipeline item {item!r}: expected name{{key=value,...}}")
        pass_cls = get_pass_class(name)
        raw = _parse_options(rest[:-1], pass_cls.name) if rest else {}
        passes.append(pass_cls(build_config(pass_cls, raw)))
    if not passes:  # e.g. "," — its printed form "" would not parse back
        raise ValueError(f"empty pipeline {text!r}: give at least one pass (see `slmopt list-passes`)")
    _validate_order(passes)
    return Pipeline(passes)


def _validate_order(passes: list[Pass]) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(passes):
        if p.name in seen:
            raise ValueError(f"pass {p.name!r} appears twice; each pass runs once")
        seen[p.name] = i
    for i, p in enumerate(passes):
        for earlier in p.run_after:
            if earlier in seen and seen[earlier] > i:
                raise ValueError(f"pass {p.name!r} must come after {earlier!r} in the pipeline")


# ----------------------------------------------------------------------------------------------- running
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
        extras: free-form per-run values (e.g. tokenizer), for passes that need them.
    """

    calib: torch.Tensor | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    backend: str = "onnxruntime"
    progress: bool = True
    reference: Program | None = None
    instruments: list[Instrument] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def require_calib(self, pass_name: str, min_samples: int = 1) -> torch.Tensor:
        if self.calib is None or len(self.calib) < min_samples:
            raise ValueError(f"pass {pass_name!r} needs calibration data: pass --calib FILE")
        return self.calib

    def sample_inputs(self, program: Program, n: int = 2) -> tuple[torch.Tensor, ...]:
        """Inputs for verification: a few calibration rows, else the program's example inputs."""
        if self.calib is not None and len(program.example_inputs) == 1:
            return (self.calib[:n],)
        return program.example_inputs


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
