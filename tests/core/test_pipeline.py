"""Pipeline strings, config parsing, the PassManager and its instruments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmopt.errors import PassError, UserError
from slmopt.pipeline.instruments import DumpGraph, TimePasses, VerifyEach
from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.parse import parse_pipeline
from slmopt.pipeline.pass_base import Change, Pass, PassResult, get_pass_class, register_pass
from slmopt.program import ModelInfo, capture


@register_pass("test-scale", aliases=("tscale",))
class ScaleWeights(Pass):
    """Multiplies every linear weight by a factor (a toy pass that changes the function)."""

    @dataclass(frozen=True)
    class Config:
        factor: float = field(default=2.0, metadata={"help": "multiplier"})
        layers: tuple[int, ...] = field(default=(), metadata={"help": "layer indices"})
        mode: Literal["all", "first"] = field(default="all", metadata={"help": "which weights"})
        enabled: bool = field(default=True, metadata={"help": "do anything at all"})

        def __post_init__(self) -> None:
            if self.factor <= 0:
                raise ValueError(f"factor must be > 0, got {self.factor}")

    def call(self, program, ctx):
        report = self.new_report(program)
        if self.config.enabled:
            for name, param in program.graph_module.named_parameters():
                if name.endswith("weight"):
                    param.data.mul_(self.config.factor)
                    report.changes.append(Change("scale", name, {"factor": self.config.factor}))
                    if self.config.mode == "first":
                        break
        return PassResult(program, self.finish_report(report, program, 0.0))


@register_pass("test-boom")
class Boom(Pass):
    @dataclass(frozen=True)
    class Config:
        kind: Literal["runtime", "value"] = "runtime"

    def call(self, program, ctx):
        if self.config.kind == "value":
            raise ValueError("this model has nothing to boom")
        raise RuntimeError("kaboom")


@register_pass("test-late")
class Late(ScaleWeights):
    run_after = ("test-scale",)


def _program():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    info = ModelInfo(kind="module", source="seq", input_names=["x"], dynamic_dims=[{0: "batch"}])
    return model, capture(model, (torch.randn(3, 4),), info)


def test_canonical_form_resolves_every_option():
    assert str(parse_pipeline("tscale")) == "test-scale{factor=2.0,layers=,mode=all,enabled=true}"
    text = "test-scale{factor=3,layers=1,2, mode=first}"
    assert str(parse_pipeline(text)) == "test-scale{factor=3.0,layers=1,2,mode=first,enabled=true}"


def test_space_separated_options_and_brackets():
    pipe = parse_pipeline("test-scale{factor=0.5 layers=[4,5] enabled=false}")
    cfg = pipe.passes[0].config
    assert (cfg.factor, cfg.layers, cfg.enabled) == (0.5, (4, 5), False)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("nope", "valid passes"),
        ("test-scale{bogus=1}", "valid options: enabled, factor, layers, mode"),
        ("test-scale{factor=abc}", "not a valid float"),
        ("test-scale{factor=-1}", "factor must be > 0"),
        ("test-scale{mode=some}", "not one of all, first"),
        ("test-scale{enabled=maybe}", "not a boolean"),
        ("test-scale{factor=2", "unbalanced"),
        ("test-scale{factor=2,factor=3}", "given twice"),
        ("test-scale,test-scale", "appears twice"),
        ("test-late,test-scale", "must come after 'test-scale'"),
        ("", "empty pipeline"),
    ],
)
def test_parse_errors_name_the_problem(text, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        parse_pipeline(text)


@settings(max_examples=60, deadline=None)
@given(
    factor=st.floats(min_value=1e-3, max_value=1e3, allow_nan=False),
    layers=st.lists(st.integers(min_value=0, max_value=99), max_size=5),
    mode=st.sampled_from(["all", "first"]),
    enabled=st.booleans(),
)
def test_round_trip(factor, layers, mode, enabled):
    text = (
        f"test-scale{{factor={factor!r},layers={','.join(map(str, layers))},mode={mode},enabled={enabled}}}"
    )
    pipe = parse_pipeline(text)
    cfg = pipe.passes[0].config
    assert cfg == ScaleWeights.Config(factor=factor, layers=tuple(layers), mode=mode, enabled=enabled)
    assert str(parse_pipeline(str(pipe))) == str(pipe)


def test_manager_never_touches_the_input_and_records_history(tmp_path):
    model, program = _program()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prog_before = {k: v.clone() for k, v in program.graph_module.state_dict().items()}
    x = torch.randn(5, 4)
    expected = model(x)
    timer, verify = TimePasses(), VerifyEach()
    ctx = PassContext(instruments=[DumpGraph(tmp_path), timer, verify])
    out, reports = PassManager(parse_pipeline("test-scale{factor=2}")).run(program, ctx)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in program.graph_module.state_dict().items():
        assert torch.equal(v, prog_before[k])
    # Two linears scaled by 2 with a ReLU between: y' = 4·W2·relu(W1 x + b1/2·...) — compute it directly.
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    reference = (2 * w2) @ torch.relu((2 * w1) @ x.T + b1[:, None]) + b2[:, None]
    torch.testing.assert_close(out(x), reference.T)
    assert not torch.allclose(out(x), expected)
    assert [c.kind for c in reports[0].changes] == ["scale", "scale"]
    assert out.history[0]["options"].startswith("test-scale{factor=2.0")
    assert reports[0].metrics["verify_max_abs_diff"] > 0
    assert [name for name, _ in timer.times] == ["test-scale"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00-input.py", "00-input.txt", "01-test-scale.py", "01-test-scale.txt"
    ]  # fmt: skip
    assert "linear" in (tmp_path / "01-test-scale.txt").read_text()


def test_pass_that_changes_nothing_warns():
    _, program = _program()
    _, reports = PassManager(parse_pipeline("test-scale{enabled=false}")).run(program, PassContext())
    assert reports[0].warnings == ["test-scale: nothing changed"]


def test_failures_name_the_pass_and_its_predecessors():
    _, program = _program()
    with pytest.raises(PassError, match=r"pass 'test-boom' failed \(after: test-scale\): kaboom") as info:
        PassManager(parse_pipeline("test-scale,test-boom")).run(program, PassContext())
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(UserError, match="pass 'test-boom': this model has nothing to boom"):
        PassManager(parse_pipeline("test-boom{kind=value}")).run(program, PassContext())


def test_lookup_by_alias_and_builtin_lazy_import():
    assert get_pass_class("tscale") is ScaleWeights
    assert get_pass_class("sparsity").name == "mask-2to4"


# ------------------------------------------------------------------- what passes declare for the driver
@register_pass("test-fork")
class Fork(Pass):
    """Fans out into two variants whose first weight is scaled by 1 and by 3."""

    needs_original = True
    replay_option = "source"

    @dataclass(frozen=True)
    class Config:
        source: str = field(default="", metadata={"help": "report to replay"})

    def call(self, program, ctx):
        variants = {}
        for factor in (1, 3):
            variant = program.clone()
            name = next(n for n, _ in variant.graph_module.named_parameters() if n.endswith("weight"))
            variant.param(name).data.mul_(factor)
            variants[f"x{factor}"] = variant
        report = self.new_report(program)
        report.changes.append(Change("fork", "model", {"variants": sorted(variants)}))
        return PassResult(program, self.finish_report(report, program, 0.0), variants)


def test_fan_out_records_the_fanning_pass_and_runs_the_rest_on_each_variant(tmp_path):
    model, program = _program()
    manager = PassManager(parse_pipeline("test-fork,test-scale{factor=2}"))
    _, reports = manager.run(program, PassContext())
    assert isinstance(manager.fanned_out, Fork) and [r.name for r in reports] == ["test-fork"]
    assert sorted(manager.variants) == ["x1", "x3"]
    x = torch.randn(5, 4)
    # Independent reference: the eager model with its weights scaled by hand (first by the variant
    # factor, then every weight by test-scale's 2).
    for factor in (1, 3):
        w0, b0, w1, b1 = (p.detach() for p in model.parameters())
        expected = torch.relu(x @ (w0 * factor * 2).T + b0) @ (w1 * 2).T + b1
        variant, after = manager.variants[f"x{factor}"]
        torch.testing.assert_close(variant(x), expected)
        assert [r.name for r in after] == ["test-scale"]
    folder = tmp_path / "subnet-x3"
    folder.mkdir()
    report = type("Report", (), {"params_after": 68})()
    row = manager.fanned_out.variant_row("x3", folder, report, reports[0].metrics, None)
    assert row == {"variant": "x3", "params": 68, "folder": "subnet-x3"}
    assert manager.fanned_out.write_variant_summary([row], tmp_path) == {}


def test_driver_reads_declarations_not_pass_names(tmp_path):
    from slmopt.api import CompileOptions, _needs_original, _replay_pipeline

    quiet = CompileOptions(bench=False)
    assert _needs_original(quiet, parse_pipeline("test-fork"), reloadable=True)  # declared needs_original
    assert not _needs_original(quiet, parse_pipeline("test-scale"), reloadable=True)
    recorded = tmp_path / "report.json"
    recorded.write_text('{"pipeline": "test-scale,test-fork"}')
    replayed = _replay_pipeline(parse_pipeline("test-scale,test-fork"), str(recorded))
    assert replayed.passes[1].config.source == str(recorded.resolve())
    assert str(replayed).endswith(f"test-fork{{source={recorded.resolve()}}}")
    with pytest.raises(UserError, match=r"--replay needs a pass .*: .*elastic.*test-fork"):
        _replay_pipeline(parse_pipeline("test-scale"), str(recorded))
