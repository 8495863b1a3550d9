"""The ``fff`` pass and everything it uses: dense FFN → fast-feedforward tree conversion.

Modules: ``ffn_to_fff`` (the pass; not named ``pass``, a keyword), ``layer`` (the trainable FFF module),
``convert`` (neuron partition into a tree), ``fit`` (routers, leaf refits), ``distill`` (layer-local
distillation) and ``graph`` (swapping the FFN subgraph for the ``slmopt::fff`` op).

Example:
    >>> from slmopt.passes.fff import FFNToFFF
    >>> FFNToFFF.name
    'fff'
"""

from __future__ import annotations

from slmopt.passes.fff.ffn_to_fff import FFNToFFF
from slmopt.passes.fff.layer import FFF

__all__ = ["FFF", "FFNToFFF"]
