"""No silent partial coverage: a pass asked to cover every block refuses a model analysis only half understood.

A pass that rewrites "all block linears" (the default of ``mask-2to4``, ``prune-attn``, ``fff`` and
``elastic``) can only touch what analysis classified. When analysis left linears outside any recognised
sublayer (e.g. an FFN whose activation it does not know), running anyway would exit 0 with part of the
model untouched. :func:`check_coverage` turns that into one clear line (a ``ValueError``, which the
pipeline reports as a user error, CLI exit 2) unless the user narrowed the pass with ``layers=``/``roles=``;
it also returns the ``covered/total`` figure every pass puts in its report.

Example:
    >>> from slmopt.analysis.coverage import check_coverage
    >>> check_coverage(analyze(program), "mask-2to4", narrowed=False)  # doctest: +SKIP
    {'covered': 16, 'total': 16, 'text': '16/16 block linears'}
"""

from __future__ import annotations

import logging
from typing import Any

from slmopt.analysis.structure import Structure

log = logging.getLogger(__name__)

__all__ = ["RECOVERY_PREFIX", "check_coverage", "coverage_text", "recovery_linears", "uncovered_linears"]

_NAMED = 3  # weights named in the one-line error; the rest are counted
# Parameters slmopt itself adds in place of a removed sublayer (a mean-output bias or a low-rank map fitted
# on calibration data). They are not the model's block linears, so no pass is asked to cover them.
RECOVERY_PREFIX = "slmopt_recovery."


def recovery_linears(structure: Structure) -> list[str]:
    """Weights of the low-rank recovery maps an earlier removal put into the residual stream."""
    return [i.weight for i in structure.linears if i.weight.startswith(RECOVERY_PREFIX)]


def coverage_text(covered: int, total: int, recovery: int = 0) -> str:
    """The report's coverage line, e.g. ``"12/12 block linears (2 recovery-map linears left alone)"``."""
    text = f"{covered}/{total} block linears"
    return text + (f" ({recovery} recovery-map linears of removed sublayers left alone)" if recovery else "")


def uncovered_linears(structure: Structure) -> list[str]:
    """Weights of linears analysis could not place in a block (the LM head is not a block linear)."""
    return [
        i.weight
        for i in structure.linears
        if i.block is None and i.role == "other" and not i.weight.startswith(RECOVERY_PREFIX)
    ]


def check_coverage(structure: Structure, pass_name: str, narrowed: bool) -> dict[str, Any]:
    """Block linears the pass can reach vs all candidates; raises when some are out of reach.

    Args:
        structure: the analysis the pass works from.
        pass_name: the pass (for the log; the pipeline prefixes the error with it).
        narrowed: the user limited the pass (``layers=``/``roles=``): then the unclassified rest is
            intentionally out of scope and only reported.

    Returns:
        ``{"covered": c, "total": t, "text": "c/t block linears"}`` for the pass report.

    Raises:
        ValueError: linears are unclassified and the pass was asked to cover everything.
    """
    stray = uncovered_linears(structure)
    covered = sum(1 for i in structure.linears if i.block is not None)
    total = covered + len(stray)
    if stray:
        log.info("%s: %d linear(s) outside recognised blocks: %s", pass_name, len(stray), ", ".join(stray))
    if stray and not narrowed:
        named = ", ".join(stray[:_NAMED]) + (
            f" and {len(stray) - _NAMED} more" if len(stray) > _NAMED else ""
        )
        raise ValueError(
            f"asked to cover every block, it would reach only {covered}/{total} block linears: analysis "
            f"could not classify "
            f"{named}; `slmopt inspect MODEL` shows why, or narrow the pass with layers=/roles= to go on "
            "with the recognised blocks"
        )
    # Recovery maps are stated, not covered: the report shows what the pass left alone and why.
    recovery = len(recovery_linears(structure))
    result = {"covered": covered, "total": total, "text": coverage_text(covered, total, recovery)}
    if recovery:
        result["recovery_maps_left_alone"] = recovery
    return result
