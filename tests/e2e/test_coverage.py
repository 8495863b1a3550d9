"""No silent partial coverage: a planted unclassifiable sublayer makes every covering pass refuse in one line."""

from __future__ import annotations

import pytest
import torch

from slmopt.cli import main
from slmopt.errors import UserError
from slmopt.loaders import load_program
from slmopt.pipeline import PassContext, PassManager, parse_pipeline
from tests.families import available, build_family
from tests.helpers import captured, run_pipeline

PLANTED = "tests.families:planted_unclassifiable"
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_exits_2_with_one_line_naming_the_unclassified_weights(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["compile", PLANTED, "--passes", "mask-2to4{method=magnitude}", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("slmopt: error:")]
    assert code == 2
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "reach only 12/14 block linears" in lines[0]
    assert "odd.fc1.weight" in lines[0] and "odd.fc2.weight" in lines[0]
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(
    "spec", ["prune-attn{remove=1}", "fff{depth=1,distill_steps=0}", "elastic{budgets=0.75}"]
)
def test_every_covering_pass_refuses(spec: str) -> None:
    program, _ = load_program(PLANTED)
    with pytest.raises(UserError, match=r"could not classify .*odd\.fc1\.weight"):
        PassManager(parse_pipeline(spec)).run(program, PassContext(calib=CALIB, progress=False))


def test_narrowed_pass_runs_and_the_report_states_coverage(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    spec = "mask-2to4{method=magnitude,layers=0}"
    code = main(["compile", PLANTED, "--passes", spec, "--seq-len", "32", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "| 6/14 block linears |" in report  # block 0's q, k, v, o, fc1, fc2 of 14


def test_phi3_folder_masks_every_block_linear(tmp_path, capsys) -> None:
    """Issue 17's reproduction: a saved Phi-3 compiles with all 8 block linears masked (was 4 of 8, exit 0)."""
    if not available("phi3"):
        pytest.skip("transformers has no Phi-3")
    model_dir, out = tmp_path / "phi3", tmp_path / "out"
    build_family("phi3").save_pretrained(model_dir)
    code = main(["compile", str(model_dir), "--passes", "mask-2to4{method=magnitude}", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "| 8/8 block linears |" in (out / "report.md").read_text()


def test_recovery_maps_of_an_earlier_removal_are_left_alone_and_stated() -> None:
    """prune-attn's low-rank stand-ins are slmopt's own linears, not the model's: mask-2to4 after it runs,
    masks every model block linear 2:4, leaves the recovery maps dense and says so in its coverage."""
    program = captured("llama")
    spec = "prune-attn{remove=1,recover=lowrank,rank=4},mask-2to4{method=magnitude}"
    _, new, reports = run_pipeline(program, spec, calib=torch.randint(0, 64, (8, 16)))
    recovery = [name for name in new.graph_module.state_dict() if name.startswith("slmopt_recovery.")]
    assert recovery, "the lowrank recovery must have added its maps"
    coverage = reports[1].metrics["coverage"]
    assert coverage["recovery_maps_left_alone"] == 2
    assert "2 recovery-map linears of removed sublayers left alone" in coverage["text"]
    for name, weight in new.graph_module.state_dict().items():
        if name in recovery or weight.dim() != 2 or not name.startswith("model.layers."):
            continue
        groups = weight.reshape(weight.shape[0], -1, 4)  # along the input (reduction) axis
        assert bool(((groups == 0).sum(-1) >= 2).all()), f"{name} is not 2:4"
    assert all(
        bool((new.graph_module.state_dict()[n] != 0).float().mean() > 0.9)
        for n in recovery
        if "bias" not in n
    )
