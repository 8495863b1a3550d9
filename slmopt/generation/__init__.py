"""Text generation: the KV-cache transform, the sampling loop and the generation benchmark.

Modules: ``kv_cache`` (adds explicit past/present K/V to a Program), ``layout`` (the cache contract),
``window`` (causal/sliding-window masks read from the graph), ``check`` (self-checks past every window),
``generate`` (Generator, sampling) and ``bench`` (tokens/s with and without the cache).

Example:
    >>> from slmopt.generation import Generator
    >>> # Generator.from_engine("out/").generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

from slmopt.generation.bench import bench_cache_vs_recompute, bench_generation
from slmopt.generation.generate import Generator, Sampling
from slmopt.generation.kv_cache import CacheLayout, add_kv_cache

__all__ = [
    "CacheLayout",
    "Generator",
    "Sampling",
    "add_kv_cache",
    "bench_cache_vs_recompute",
    "bench_generation",
]
