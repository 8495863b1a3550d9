"""distill: recovery by distillation from the original model, after elastic or any other pass."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from slmopt.analysis.analyze import analyze
from slmopt.errors import UserError
from slmopt.pipeline.parse import parse_pipeline
from tests.helpers import run_pipeline
from tests.models import capture_model, example_ids

CALIB = example_ids(16, 16, seed=2)


@functools.cache
def _captured(name: str):
    """A zoo model with a sharpened LM head: random-init logits are nearly uniform, which would make every
    KL tiny and the test meaningless."""
    program = capture_model(name)
    head = analyze(program).lm_head
    program.set_param(head.weight, program.param(head.weight) * 20)
    return program


def _run(text: str, name: str = "llama", seed: int = 0):
    return run_pipeline(_captured(name), text, CALIB, seed=seed)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Independent reference: mean over tokens of KL(p_teacher ‖ p_student)."""
    p = F.softmax(teacher.double(), -1)
    return float((p * (p.log() - F.log_softmax(student.double(), -1))).sum(-1).mean())


def test_distill_after_elastic_reduces_kl_and_still_exports():
    manager, _, reports = _run("elastic{budgets=0.6,0.8,refine=0,head_ratios=1,0.5},distill{steps=8,lr=1e-4}")
    teacher = _captured("llama")(CALIB)
    for name in ("0.6", "0.8"):  # the rest of the pipeline ran on every subnet
        program, after = manager.variants[name]
        report = after[0]
        assert report.name == "distill" and report.metrics["steps"] == 8
        assert report.metrics["loss_after"] < report.metrics["loss_before"]
        # The reported loss is KL of the student's logits to the teacher's, recomputed here.
        assert _kl(teacher, program(CALIB)) == pytest.approx(report.metrics["loss_after"], rel=1e-3)
        program.export()  # parameters changed, graph intact
    assert not any(p.requires_grad for p in manager.variants["0.6"][0].graph_module.parameters())


def test_distill_local_after_mask_keeps_zeros():
    _, program, reports = _run("mask-2to4{method=magnitude},distill{mode=local,steps=10,lr=1e-4}")
    report = reports[-1]
    assert report.metrics["loss_after"] < report.metrics["loss_before"]
    assert report.metrics["zero_masks_kept"] > 0
    masked = [c.target for c in reports[0].changes]
    for target in masked:  # the 2:4 pattern survived training: ≥ 2 zeros in every group of 4 inputs
        w = program.param(target)
        groups = (w.reshape(-1, 4) == 0).sum(-1) if w.shape[-1] % 4 == 0 else None
        if groups is not None and target.endswith("proj.weight"):
            assert bool((groups >= 2).all()), target


def test_distill_is_deterministic_for_fixed_steps():
    _, a, _ = _run("distill{steps=3}", seed=1)
    _, b, _ = _run("distill{steps=3}", seed=1)
    for (name, x), (_, y) in zip(
        a.graph_module.named_parameters(), b.graph_module.named_parameters(), strict=True
    ):
        assert torch.equal(x, y), name
    changed = [
        n for n, x in a.graph_module.named_parameters() if not torch.equal(x, _captured("llama").param(n))
    ]
    assert changed  # the steps did train


def test_local_mode_needs_corresponding_blocks():
    with pytest.raises(UserError, match="mode=logits"):
        _run("prune-attn{target=block,remove=1},distill{mode=local}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("distill{steps=0}", "steps must be >= 1"),
        ("distill{lr=0}", "lr must be > 0"),
        ("distill{mode=x}", "x"),
    ],
)
def test_bad_options(text, message):
    with pytest.raises(ValueError, match=message):
        parse_pipeline(text)


def test_distill_needs_calibration():
    with pytest.raises(UserError, match="calibration"):
        run_pipeline(_captured("llama"), "distill", calib=None)
