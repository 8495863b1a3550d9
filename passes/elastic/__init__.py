"""The ``elastic`` pass and everything it uses: nested subnets sliced to parameter or latency budgets.

Modules: ``elastic`` (the pass), ``plan`` (unit orders and budget plans), ``surgery`` (reorder and
extract weights), ``latency`` (latency-budget plans) and ``report`` (the subnet Pareto table).

Example:
    >>> from slmopt.passes.elastic import Elastic
    >>> Elastic.name
    'elastic'
"""

from __future__ import annotations

from slmopt.passes.elastic.elastic import Elastic

__all__ = ["Elastic"]
