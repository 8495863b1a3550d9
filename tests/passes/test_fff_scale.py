"""Issue 14: the fff pass's compile cost at scale (resumed collection, cheaper fitting) keeps its results."""

from __future__ import annotations

import torch

import slmopt.passes.fff.ffn_to_fff  # noqa: F401 - registers the fff pass
from slmopt.analysis.analyze import analyze
from slmopt.data.runner import PrefixCache
from slmopt.passes.fff.convert import DenseFFN, FFFTree
from slmopt.passes.fff.graph import collect_branch_inputs, replace_ffn
from tests.models import capture_model, example_ids


def _random_tree(program, ffn) -> FFFTree:
    dense = DenseFFN.from_program(program, ffn)
    gen = torch.Generator().manual_seed(1)
    tree = FFFTree.from_dense(dense, torch.randperm(dense.width, generator=gen)[:48].reshape(2, 24))
    tree.node_w = torch.randn(tree.node_w.shape, generator=gen)
    return tree


def test_resumed_collection_equals_a_full_forward_after_an_edit() -> None:
    program = capture_model("llama")
    ffns = [b.ffn for b in analyze(program).blocks]
    calib = example_ids(batch=20, seq=16, vocab=program.info.vocab_size)  # batches of 8, 8 and 4 rows
    cache = PrefixCache()
    first = collect_branch_inputs(program, ffns[0].branch_input, calib, 10_000, 0, cache)
    assert torch.equal(first, collect_branch_inputs(program, ffns[0].branch_input, calib, 10_000, 0))
    assert cache.resumed == 0 and len(cache.batches) == 3
    # Layer 0's FFN becomes an fff op (after the cut): layer 1's inputs must flow through it.
    replace_ffn(program, ffns[0], _random_tree(program, ffns[0]), prefix="fff.block0")
    resumed = collect_branch_inputs(program, ffns[1].branch_input, calib, 10_000, 0, cache)
    assert cache.resumed == 3
    full = collect_branch_inputs(program, ffns[1].branch_input, calib, 10_000, 0)
    assert torch.equal(resumed, full)
    assert full.shape == (20 * 16, program.param(ffns[1].up.weight).shape[-1])


def test_a_node_before_the_cut_runs_from_the_inputs() -> None:
    program = capture_model("llama")
    ffns = [b.ffn for b in analyze(program).blocks]
    calib = example_ids(batch=9, seq=16, vocab=program.info.vocab_size)
    cache = PrefixCache()
    collect_branch_inputs(program, ffns[1].branch_input, calib, 10_000, 0, cache)
    early = collect_branch_inputs(program, ffns[0].branch_input, calib, 10_000, 0, cache)
    assert cache.resumed == 0
    assert torch.equal(early, collect_branch_inputs(program, ffns[0].branch_input, calib, 10_000, 0))
