"""Structure analysis: finds blocks, attention, FFNs, linears and norms from graph patterns.

Modules: ``analyze`` (the analysis driver), ``structure`` (the result dataclasses), ``graph`` (the
networkx view of an FX graph and linear matching) and ``patterns`` (activation/norm/attention matchers).

Example:
    >>> from slmopt.analysis import analyze, Structure
    >>> # structure = analyze(program); structure.blocks[0].ffn
"""

from __future__ import annotations

from slmopt.analysis.analyze import analyze
from slmopt.analysis.graph import GraphView, find_linears
from slmopt.analysis.structure import AttentionInfo, BlockInfo, FFNInfo, LinearInfo, NormInfo, Structure

__all__ = [
    "AttentionInfo",
    "BlockInfo",
    "FFNInfo",
    "GraphView",
    "LinearInfo",
    "NormInfo",
    "Structure",
    "analyze",
    "find_linears",
]
