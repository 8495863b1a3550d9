"""Giving freed memory back to the operating system between the phases of a compile.

A compile allocates and frees hundreds of MB per phase (calibration activations, export temporaries, ONNX
Runtime sessions). glibc serves most of those from its heap, and a freed block in the middle of the heap
stays resident until something asks for it back, so the next phase's weights land *on top of* the last
phase's garbage: measured on GPT-2-small, releasing (with a full collection) after the FFF pass took the
process from 1.35 to 0.91 GB resident (benchmarks/memory_stages.py). :func:`release_freed_memory` calls ``malloc_trim(0)``,
which returns every whole free page of every arena, after collecting Python cycles when asked (FX graphs
are full of them). The trim costs milliseconds, the collection ≈0.4 s, so both run at phase boundaries
only, never inside a hot loop.

It also clears one known retainer: onnxscript's rewrite rules are module-level objects whose pattern
matcher remembers the graph, node and match of its last run, so after an ONNX export the whole exported
graph, whose initializers wrap the model's parameters, stays alive until the next export. A Program
dropped after lowering (the bench's original model) was therefore never freed: 0.5 GB on GPT-2-small.

Example:
    >>> from slmopt.memory import release_freed_memory
    >>> trimmed = release_freed_memory()  # between phases
    >>> trimmed = release_freed_memory(collect_cycles=True)  # after dropping the last reference to a Program
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["forget_onnx_rewriter_matches", "release_freed_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


# State an onnxscript (0.7) pattern matcher sets afresh at the start of every match.
_MATCHER_STATE = ("_graph", "_current_node", "_match", "_tracer")


def _rewrite_rules() -> Iterator[Any]:
    """Every rewrite rule bound at module level in the imported onnxscript rewriter modules."""
    rule_sets = sys.modules.get("onnxscript.rewriter._rewrite_rule")
    rule_set_type = getattr(rule_sets, "RewriteRuleSet", ())
    for name, module in list(sys.modules.items()):
        if not name.startswith("onnxscript.rewriter") or module is None:
            continue
        for value in list(vars(module).values()):
            if rule_set_type and isinstance(value, rule_set_type):
                yield from value.rules
            elif isinstance(value, (list, tuple)):
                yield from value
            else:
                yield value


def forget_onnx_rewriter_matches() -> int:
    """Drops the graphs onnxscript's pattern matchers keep from their last match; returns how many."""
    matchers = sys.modules.get("onnxscript.rewriter._matcher")
    if matchers is None:  # the exporter never ran in this process
        return 0
    cleared = 0
    for rule in _rewrite_rules():
        matcher = getattr(rule, "_matcher", None)
        if isinstance(matcher, matchers.PatternMatcher):
            for state in _MATCHER_STATE:
                if getattr(matcher, state, None) is not None:
                    setattr(matcher, state, None)
                    cleared += 1
    return cleared


def release_freed_memory(collect_cycles: bool = False) -> bool:
    """Returns free heap pages to the OS; True if the heap was trimmed.

    Args:
        collect_cycles: run a full ``gc.collect()`` first. Needed right after dropping a Program (FX
            graphs are reference cycles, freed only by the collector), but it walks every Python object
            (≈0.4 s in a process with torch, transformers and onnx loaded), so plain phase boundaries skip it.
    """
    forget_onnx_rewriter_matches()
    if collect_cycles:
        gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
