"""Tests for slmopt.data.metrics against formulas written out independently here."""

from __future__ import annotations

import math
from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from slmopt.data.metrics import (
    bits_per_byte,
    cross_entropy_nats,
    max_abs_diff,
    perplexity,
    predicted_tokens,
    summarize_quality,
)


def _bigram(vocab: int, seed: int = 0):
    """A 'model' whose logits at each position depend only on the current token (a lookup table)."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0
    return table, (lambda ids: table[ids])


def _reference_nll(table: torch.Tensor, tokens: torch.Tensor) -> float:
    """Plain-Python mean of -log softmax(table[x_t])[x_{t+1}] over every window and position."""
    total, count = 0.0, 0
    for row in tokens.tolist():
        for cur, nxt in pairwise(row):
            logits = [float(v) for v in table[cur]]
            m = max(logits)
            log_z = m + math.log(sum(math.exp(v - m) for v in logits))
            total += log_z - logits[nxt]
            count += 1
    return total / count


@pytest.mark.parametrize("vocab", [2, 7, 256])
def test_uniform_logits_give_log_vocab(vocab: int) -> None:
    tokens = torch.randint(0, vocab, (5, 9), generator=torch.Generator().manual_seed(1))
    nats = cross_entropy_nats(lambda ids: torch.zeros(*ids.shape, vocab), tokens, progress=False)
    assert nats == pytest.approx(math.log(vocab), abs=1e-6)


def test_matches_hand_computed_cross_entropy() -> None:
    table, fn = _bigram(11)
    tokens = torch.randint(0, 11, (6, 13), generator=torch.Generator().manual_seed(2))
    assert cross_entropy_nats(fn, tokens, batch_size=4, progress=False) == pytest.approx(
        _reference_nll(table, tokens), rel=1e-5
    )


def test_tiny_case_with_functional_cross_entropy() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])
    tokens = torch.tensor([[0, 2, 1]])
    # Position 0 predicts token 2, position 1 predicts token 1; position 2 predicts nothing.
    expected = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([2, 1])).item()
    assert cross_entropy_nats(lambda ids: logits, tokens, progress=False) == pytest.approx(expected, rel=1e-6)


def test_batch_size_does_not_change_the_result() -> None:
    _, fn = _bigram(17, seed=3)
    tokens = torch.randint(0, 17, (9, 20), generator=torch.Generator().manual_seed(4))
    values = [cross_entropy_nats(fn, tokens, batch_size=b, progress=False) for b in (1, 2, 4, 9, 64)]
    assert max(values) - min(values) < 1e-9


def test_accepts_numpy_model_outputs_and_tuples() -> None:
    table, fn = _bigram(5, seed=5)
    tokens = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(6))
    ref = cross_entropy_nats(fn, tokens, progress=False)
    as_numpy = lambda ids: fn(ids).numpy()  # what an ONNX Runtime session returns  # noqa: E731
    as_hf = lambda ids: SimpleNamespace(logits=fn(ids))  # noqa: E731
    as_tuple = lambda ids: (fn(ids), None)  # noqa: E731
    for wrapped in (as_numpy, as_hf, as_tuple):
        assert cross_entropy_nats(wrapped, tokens, progress=False) == pytest.approx(ref, abs=1e-9)


def test_works_with_a_torch_module() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(13, 8), torch.nn.Linear(8, 13))
    tokens = torch.randint(0, 13, (4, 10))
    table = model[1](model[0].weight).detach()  # the module is a bigram table in disguise
    assert cross_entropy_nats(model, tokens, progress=False) == pytest.approx(
        _reference_nll(table, tokens), rel=1e-5
    )


@pytest.mark.parametrize(
    ("fn", "tokens", "match"),
    [
        (lambda ids: torch.zeros(*ids.shape, 4), torch.zeros(3, 1, dtype=torch.long), "seq >= 2"),
        (lambda ids: torch.zeros(*ids.shape, 4), torch.zeros(6, dtype=torch.long), "tokens must be"),
        (lambda ids: torch.zeros(ids.shape[0], 4), torch.zeros(2, 5, dtype=torch.long), "expected"),
        (lambda ids: torch.zeros(*ids.shape, 4), torch.full((2, 5), 4), ">= logits vocab"),
    ],
)
def test_bad_inputs_raise(fn, tokens, match) -> None:
    with pytest.raises(ValueError, match=match):
        cross_entropy_nats(fn, tokens, progress=False)


def test_non_tensor_output_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        cross_entropy_nats(lambda ids: "logits", torch.zeros(1, 3, dtype=torch.long), progress=False)


def test_progress_false_prints_nothing(capsys) -> None:
    cross_entropy_nats(
        lambda ids: torch.zeros(*ids.shape, 3), torch.zeros(4, 3, dtype=torch.long), progress=False
    )
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_conversions() -> None:
    assert bits_per_byte(math.log(2.0)) == pytest.approx(1.0)
    assert bits_per_byte(1.367) == pytest.approx(1.367 / 0.6931471805599453)
    assert bits_per_byte(math.log(16.0), bytes_per_token=4.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, bytes_per_token=0.0)
    assert perplexity(math.log(42.0)) == pytest.approx(42.0)
    assert perplexity(1e6) == math.inf
    assert predicted_tokens(torch.zeros(3, 10)) == 27


def test_max_abs_diff() -> None:
    a = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    b = np.array([[1.0, -2.5], [3.0, 4.25]])
    assert max_abs_diff(a, b) == pytest.approx(0.5)
    assert max_abs_diff(a, a) == 0.0
    assert max_abs_diff(torch.tensor([math.inf]), torch.tensor([math.inf])) == 0.0
    assert max_abs_diff(torch.tensor([math.inf]), torch.tensor([1.0])) == math.inf
    assert math.isnan(max_abs_diff(torch.tensor([math.nan]), torch.tensor([1.0])))
    assert max_abs_diff(torch.zeros(0), torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        max_abs_diff(torch.zeros(2), torch.zeros(3))


def test_summarize_quality() -> None:
    q = summarize_quality(math.log(4.0), 1000, byte_level=True)
    assert q == {
        "nats_per_token": pytest.approx(math.log(4.0)),
        "bits_per_token": pytest.approx(2.0),
        "perplexity": pytest.approx(4.0),
        "tokens": 1000,
        "bits_per_byte": pytest.approx(2.0),
    }
    assert summarize_quality(math.log(4.0), 10, bytes_per_token=4.0)["bits_per_byte"] == pytest.approx(0.5)
    assert "bits_per_byte" not in summarize_quality(1.0, 10)
