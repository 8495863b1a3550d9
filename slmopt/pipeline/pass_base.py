"""Pass base class, reports and the lazy pass registry.

A pass is a small class with a frozen ``Config`` dataclass. Config fields carry their help text in
``field(metadata={"help": ...})`` and are validated in ``__post_init__``. Built-in passes are listed in
``BUILTIN_PASSES`` as ``"module:Class"`` strings and imported only when first used, so ``import slmopt``
stays light and the core never imports a pass module by name.

Example:
    >>> from dataclasses import dataclass, field
    >>> @register_pass("noop", aliases=("nothing",))
    ... class NoOp(Pass):
    ...     @dataclass(frozen=True)
    ...     class Config:
    ...         level: int = field(default=1, metadata={"help": "how hard to do nothing"})
    ...     def call(self, program, ctx):
    ...         return PassResult(program, self.new_report(program))
    >>> get_pass_class("nothing") is NoOp
    True
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from slmopt.pipeline.options import format_options

if TYPE_CHECKING:
    from slmopt.pipeline.manager import PassContext
    from slmopt.program import Program

__all__ = [
    "BUILTIN_PASSES",
    "Change",
    "Pass",
    "PassReport",
    "PassResult",
    "all_pass_names",
    "get_pass_class",
    "register_pass",
    "resolve_pass_name",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassSpec:
    """Where a built-in pass lives and what else it may be called."""

    target: str  # "module:Class"
    aliases: tuple[str, ...] = ()


# name -> spec. Strings, not imports: a pass module loads on first use.
BUILTIN_PASSES: dict[str, PassSpec] = {
    "mask-2to4": PassSpec("slmopt.passes.sparsity.mask_2to4:Mask2to4", ("sparsity",)),
    "prune-attn": PassSpec("slmopt.passes.prune_attention:PruneAttention", ("prune",)),
    "fff": PassSpec("slmopt.passes.fff.ffn_to_fff:FFNToFFF", ("ffn-to-fff",)),
    "elastic": PassSpec("slmopt.passes.elastic.elastic:Elastic", ("subnets",)),
    "distill": PassSpec("slmopt.passes.distill:Distill", ()),
}

_REGISTRY: dict[str, type[Pass]] = {}
_ALIASES: dict[str, str] = {}


@dataclass(frozen=True)
class Change:
    """One decision a pass made, precise enough to replay it (``kind``, what it touched, the details)."""

    kind: str
    target: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassReport:
    """What a pass did: its changes, size before/after, time, warnings and pass-specific tables."""

    name: str
    options: str
    changes: list[Change] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassResult:
    program: Program
    report: PassReport
    # Fan-out (e.g. elastic subnets): named programs the rest of the pipeline runs on, one result each.
    variants: dict[str, Program] = field(default_factory=dict)


class Pass(ABC):
    """Base class: ``requires`` checks preconditions, ``call`` rewrites, ``ensures`` checks the result.

    Subclasses define a nested frozen dataclass ``Config`` and are registered with :func:`register_pass`.
    ``run_after`` names passes that, when both are in a pipeline, must come earlier (validated at parse
    time, never silently re-sorted).

    What the compile driver must know about a pass is declared here, so the driver never tests pass
    names: ``needs_original`` (the pass reads ``ctx.reference``, the untouched input Program),
    ``replay_option`` (the Config field that takes ``--replay REPORT``) and, for a pass whose result fans
    out into variants, :meth:`variant_row` / :meth:`write_variant_summary` (the top-level report table).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type]
    run_after: ClassVar[tuple[str, ...]] = ()
    # True: the pass compares against the untouched input (e.g. a distillation teacher), so the pipeline
    # must run on a copy and keep the original in ``ctx.reference``.
    needs_original: ClassVar[bool] = False
    # The Config field (a report path) that makes the pass repeat an earlier run's recorded decisions.
    replay_option: ClassVar[str | None] = None

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def requires(self, program: Program, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raises ValueError when the pass cannot apply to ``program`` (with the reason)."""

    @abstractmethod
    def call(self, program: Program, ctx: PassContext) -> PassResult:
        """Rewrites ``program`` (the pipeline's own copy) and returns it with a report."""

    def ensures(self, program: Program, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raises AssertionError/ValueError if the pass's postcondition does not hold."""

    def variant_row(
        self, name: str, folder: Path, report: Any, metrics: dict[str, Any], options: Any
    ) -> dict[str, Any]:
        """One row of the top-level table for a fan-out variant lowered into ``folder``.

        Args:
            name: the variant's name (a key of ``PassResult.variants``).
            folder: the variant's output folder (engine, manifest, its own report).
            report: the variant's ``CompileReport``.
            metrics: this pass's own ``PassReport.metrics``.
            options: the run's ``CompileOptions``.
        """
        return {"variant": name, "params": report.params_after, "folder": folder.name}

    def write_variant_summary(self, rows: list[dict[str, Any]], folder: Path) -> dict[str, str]:
        """Writes fan-out summaries (e.g. a chart) into ``folder``; returns artifact name -> file name."""
        return {}

    def options_string(self) -> str:
        """Canonical ``name{k=v,...}`` with every option resolved."""
        return f"{self.name}{format_options(self.config)}"

    def new_report(self, program: Program) -> PassReport:
        return PassReport(
            name=self.name,
            options=self.options_string(),
            params_before=program.num_params(),
            nodes_before=program.num_nodes(),
        )

    def finish_report(self, report: PassReport, program: Program, started: float) -> PassReport:
        report.params_after = program.num_params()
        report.nodes_after = program.num_nodes()
        report.seconds = time.perf_counter() - started
        if not report.changes:
            report.warnings.append(f"{self.name}: nothing changed")
        return report


def register_pass(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator registering a pass under ``name`` (and aliases)."""

    def wrap(cls: type[Pass]) -> type[Pass]:
        if not hasattr(cls, "Config"):
            raise TypeError(f"pass {cls.__name__} must define a nested frozen dataclass Config")
        cls.name = name
        cls.aliases = tuple(aliases)
        _REGISTRY[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return wrap


def all_pass_names() -> list[str]:
    return sorted(set(BUILTIN_PASSES) | set(_REGISTRY))


def resolve_pass_name(name: str) -> str:
    """Maps an alias to its pass name; raises ValueError listing the valid names."""
    if name in _REGISTRY or name in BUILTIN_PASSES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    for canonical, spec in BUILTIN_PASSES.items():
        if name in spec.aliases:
            return canonical
    choices = ", ".join(all_pass_names())
    raise ValueError(f"unknown pass {name!r}; valid passes: {choices}")


def get_pass_class(name: str) -> type[Pass]:
    """Returns the pass class for a name or alias, importing a built-in pass module on first use."""
    canonical = resolve_pass_name(name)
    if canonical not in _REGISTRY:
        module_name, cls_name = BUILTIN_PASSES[canonical].target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("slmopt.passes"):
                raise ValueError(f"pass {canonical!r} is not available in this build of slmopt") from err
            raise
        cls = getattr(module, cls_name)
        if canonical not in _REGISTRY:  # module defined it without the decorator
            register_pass(canonical, BUILTIN_PASSES[canonical].aliases)(cls)
    return _REGISTRY[canonical]


def config_fields(config_cls: type) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) for every option of a pass Config, for ``list-passes`` and parsing."""
    out = []
    for f in fields(config_cls):
        out.append((f.name, f.type, f.default, f.metadata.get("help", "")))
    return out
