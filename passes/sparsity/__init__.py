"""The ``mask-2to4`` pass and everything it uses: N:M weight sparsity from calibration statistics.

Modules: ``mask_2to4`` (the pass), ``methods`` (magnitude / Wanda / SparseGPT strategy table) and
``stats`` (per-linear input statistics). The N:M mask math the artifact checkers share is in the core
(:mod:`slmopt.sparsity`).

Example:
    >>> from slmopt.passes.sparsity import PRUNE_METHODS
    >>> sorted(PRUNE_METHODS)
    ['magnitude', 'sparsegpt', 'wanda']
"""

from __future__ import annotations

from slmopt.passes.sparsity.mask_2to4 import Mask2to4
from slmopt.passes.sparsity.methods import PRUNE_METHODS
from slmopt.passes.sparsity.stats import InputStats, collect_input_stats

__all__ = ["PRUNE_METHODS", "InputStats", "Mask2to4", "collect_input_stats"]
