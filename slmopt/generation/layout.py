"""The cache contract of a generation graph: one slot per remaining attention layer, and its layout.

Shared by the transform (:mod:`slmopt.generation.kv_cache`), its self-checks
(:mod:`slmopt.generation.check`) and every decoder that reads or writes a cache.

Example:
    >>> slot = CacheSlot(0, 0, "sdpa", num_heads=4, num_kv_heads=2, head_dim=16)
    >>> [tuple(t.shape) for t in empty_past(CacheLayout([slot], "float32", 128, 64), batch=1)]
    [(1, 2, 0, 16), (1, 2, 0, 16)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["CacheLayout", "CacheSlot", "empty_past"]


@dataclass
class CacheSlot:
    """One cached attention layer: its position among the remaining ones and where it came from."""

    index: int
    block: int | None  # original layer number (module path, else analysis); None if neither places it
    node: str  # name of the SDPA node it replaced
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int | None = None  # sliding-window length (keys a query sees, itself included); None: all


@dataclass
class CacheLayout:
    """The cache contract of a generation graph: inputs, outputs, shapes and sizes.

    Example:
        >>> slot = CacheSlot(0, 0, "sdpa", num_heads=4, num_kv_heads=2, head_dim=16)
        >>> CacheLayout([slot], dtype="float32", vocab_size=128, max_seq_len=64).kv_bytes_per_token()
        256
    """

    slots: list[CacheSlot]
    dtype: str
    vocab_size: int | None
    max_seq_len: int | None
    num_blocks: int = 0
    layout: str = "[batch, kv_heads, past_seq, head_dim]"
    extra: dict[str, Any] = field(default_factory=dict)

    def input_names(self) -> list[str]:
        names = ["input_ids"]
        for s in self.slots:
            names += [f"past_key_values.{s.index}.key", f"past_key_values.{s.index}.value"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for s in self.slots:
            names += [f"present.{s.index}.key", f"present.{s.index}.value"]
        return names

    def kv_bytes_per_token(self) -> int:
        """Bytes the cache grows by per token and sequence: 2 (K and V) x Hkv x D x dtype size, summed."""
        size = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return sum(2 * s.num_kv_heads * s.head_dim * size for s in self.slots)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kv_bytes_per_token": self.kv_bytes_per_token()}


def empty_past(layout: CacheLayout, batch: int, length: int = 0) -> list[torch.Tensor]:
    """Past K/V tensors of ``length`` positions (zeros) for every slot, in input order."""
    dtype = getattr(torch, layout.dtype)
    return [
        torch.zeros(batch, s.num_kv_heads, length, s.head_dim, dtype=dtype)
        for s in layout.slots
        for _ in ("key", "value")
    ]
