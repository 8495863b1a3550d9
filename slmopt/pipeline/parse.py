"""Pipeline strings: ``name{key=value,...}`` items separated by commas, parsed into a :class:`Pipeline`.

Pipeline strings follow MLIR's shape. A token inside braces without ``=`` continues the previous option's
list value, so ``prune-attn{layers=1,3,keep=0.5}`` sets ``layers=(1, 3)``. Parsing happens before any
model is loaded and fails with a ValueError naming the valid choices. ``str(parse_pipeline(s))`` is the
canonical form with every option resolved.

Example:
    >>> from slmopt.pipeline.pass_base import Pass, PassResult, register_pass
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

from dataclasses import dataclass, field

from slmopt.pipeline.options import build_config
from slmopt.pipeline.pass_base import Pass, get_pass_class

__all__ = ["Pipeline", "parse_pipeline"]


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
