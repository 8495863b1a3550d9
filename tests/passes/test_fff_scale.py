"""Issue 14: the fff pass's compile cost at scale (resumed collection, cheaper fitting) keeps its results."""

from __future__ import annotations

import numpy as np
import torch

import slmopt.passes.fff.ffn_to_fff  # noqa: F401 - registers the fff pass
from slmopt.analysis.analyze import analyze
from slmopt.data.runner import PrefixCache
from slmopt.passes.fff.convert import DenseFFN, FFFTree, _top_direction_scores
from slmopt.passes.fff.fit import _fit_logistic, _solve_spd
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


def test_top_direction_matches_numpy_svd() -> None:
    gen = torch.Generator().manual_seed(0)
    # 300 "neurons" x 2000 "tokens" with a dominant direction (clear eigengap) plus noise.
    f = torch.randn(300, 1, generator=gen) * 5 @ torch.randn(1, 2000, generator=gen)
    f = f + torch.randn(300, 2000, generator=gen)
    centred = (f - f.mean(0, keepdim=True)).double().numpy()
    u = np.linalg.svd(centred, full_matrices=False)[0][:, 0]
    got = _top_direction_scores(f).double().numpy()
    cos = abs(got @ u) / np.linalg.norm(got) / np.linalg.norm(u)
    assert cos > 0.9999


def test_spd_solve_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 50, generator=gen, dtype=torch.float64)
    spd, b = (
        a.T @ a + torch.eye(50, dtype=torch.float64),
        torch.randn(50, 3, generator=gen, dtype=torch.float64),
    )
    assert np.allclose(_solve_spd(spd, b).numpy(), np.linalg.solve(spd.numpy(), b.numpy()), atol=1e-10)
    indefinite = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    rhs = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(_solve_spd(indefinite, rhs), torch.tensor([1.0, -0.5, 1 / 3], dtype=torch.float64))


def test_warm_started_router_fit_reaches_the_cold_optimum() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.0]) + 0.3
    target = ((x @ torch.randn(6, generator=gen) + 0.3 * torch.randn(600, generator=gen)) > 0).float()
    weight = torch.rand(600, generator=gen) + 0.1
    cold = _fit_logistic(x, target, weight, 1e-3, 50)
    warm = _fit_logistic(x, target, weight, 1e-3, 50, init=(cold[0] * 0.5 + 0.1, cold[1] - 0.2))
    assert torch.allclose(cold[0], warm[0], atol=1e-4) and torch.allclose(cold[1], warm[1], atol=1e-4)
    # Reference: the objective written out here (weighted logistic loss on standardised inputs, L2 on
    # the weights only); its gradient vanishes at the returned (raw-coordinate) solution.
    mu, sd = x.mean(0).double(), x.std(0).double()
    xs, t = ((x.double() - mu) / sd), target.double()
    c = (weight / weight.mean()).double() / len(x)
    w = (warm[0].double() * sd).requires_grad_()
    b = (warm[1].double() + (warm[0].double() * mu).sum()).requires_grad_()
    z = xs @ w + b
    loss = (c * (torch.nn.functional.softplus(z) - t * z)).sum() + 1e-3 * (w * w).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-5 and float(b.grad.abs()) < 1e-5


def _fitted_problem(seed: int = 0):
    """A small gated FFN, a tree cut from it with fitted routers, and its calibration inputs/targets."""
    from slmopt.passes.fff.fit import fit_routers

    gen = torch.Generator().manual_seed(seed)
    dense = DenseFFN(
        w1=torch.randn(32, 16, generator=gen) * 0.3,
        wg=torch.randn(32, 16, generator=gen) * 0.3,
        w2=torch.randn(32, 16, generator=gen) * 0.3,
        activation="silu",
    )
    x = torch.randn(2048, 16, generator=gen)
    y = dense(x)
    tree = fit_routers(FFFTree.from_dense(dense, torch.arange(32).reshape(4, 8)), x, y)
    return tree, x, y


def _rel_mse(tree: FFFTree, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((tree(x) - y) ** 2).sum() / (y**2).sum())  # independent of convert.relative_mse


def test_bf16_distillation_improves_the_hard_routed_error_like_fp32() -> None:
    from slmopt.passes.fff.distill import distill_tree

    tree, x, y = _fitted_problem()
    start = _rel_mse(tree, x[:256], y[:256])
    results = {}
    for precision in ("float32", "bfloat16"):
        out, steps = distill_tree(
            tree, x[256:], y[256:], steps=100, seconds=1e9, lr=3e-3, x_val=x[:256], y_val=y[:256],
            precision=precision,
        )  # fmt: skip
        results[precision] = _rel_mse(out, x[:256], y[:256])
        assert out.leaf_w1.dtype == torch.float32  # master weights stay fp32
    assert results["float32"] < 0.9 * start
    assert results["bfloat16"] < 0.9 * start
    assert abs(results["bfloat16"] - results["float32"]) < 0.25 * results["float32"]


def test_distillation_stops_once_the_selection_error_stalls() -> None:
    from slmopt.passes.fff.distill import _PATIENCE, _stalled, distill_tree

    assert not _stalled([1.0, 0.9, 0.8, 0.7])  # still gaining 30 %
    assert _stalled([1.0, 0.999, 0.998, 0.998])  # 0.2 % over _PATIENCE checks
    assert not _stalled([1.0, 1.0, 1.0])  # fewer checks than the patience: keep going
    # A tree that is already exact (the targets are its own outputs) cannot improve: it stops after
    # _PATIENCE checks of 25 steps instead of running all 300.
    tree, x, _ = _fitted_problem(1)
    y = tree(x)
    _, steps = distill_tree(tree, x, y, steps=300, seconds=1e9, lr=1e-3, x_val=x[:256], y_val=y[:256])
    assert steps == 25 * _PATIENCE


def test_auto_precision_is_bf16_only_for_large_ffns_on_native_bf16(monkeypatch) -> None:
    import slmopt.passes.fff.ffn_to_fff as ffn_to_fff

    small = DenseFFN(w1=torch.zeros(512, 192), w2=torch.zeros(512, 192), activation="relu")  # tinylm
    large = DenseFFN(w1=torch.zeros(1536, 576), w2=torch.zeros(1536, 576), activation="relu")  # 135M
    monkeypatch.setattr(ffn_to_fff, "native_bf16", lambda: True)
    assert ffn_to_fff.distill_precision("auto", small) == "float32"
    assert ffn_to_fff.distill_precision("auto", large) == "bfloat16"
    assert ffn_to_fff.distill_precision("float32", large) == "float32"
    monkeypatch.setattr(ffn_to_fff, "native_bf16", lambda: False)
    assert ffn_to_fff.distill_precision("auto", large) == "float32"
    assert ffn_to_fff.distill_precision("bfloat16", small) == "bfloat16"
