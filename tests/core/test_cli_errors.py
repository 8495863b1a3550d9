"""Bad input gets one clear line on stderr, exit code 2, and no output folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from slmopt.cli import main
from tests.models import save_hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_hf("llama", tmp_path_factory.mktemp("models") / "llama")


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _assert_one_clear_line(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("slmopt: error:")]
    assert len(lines) == 1, err
    assert needle in lines[0], err
    assert "Traceback" not in err


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "compile", str(tmp_path / "nowhere"), "--passes", "sparsity", "-o", str(out))
    _assert_one_clear_line(code, err, "does not exist")
    assert not out.exists()


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    out = tmp_path.parent / f"{tmp_path.name}-out"
    code, err = _run(capsys, "compile", str(tmp_path), "-o", str(out))
    _assert_one_clear_line(code, err, "no config.json")
    assert not out.exists()


def test_corrupt_safetensors(tmp_path, capsys, llama_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in llama_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    out = tmp_path / "out"
    code, err = _run(capsys, "compile", str(broken), "-o", str(out))
    _assert_one_clear_line(code, err, "corrupt safetensors file")
    assert not out.exists()


@pytest.mark.parametrize(
    ("passes", "needle"),
    [
        ("prune-everything", "unknown pass 'prune-everything'; valid passes:"),
        ("mask-2to4{sparsity=0.5}", "has no option 'sparsity'; valid options:"),
        ("mask-2to4{method=random}", "is not one of magnitude, wanda, sparsegpt"),
        ("mask-2to4{n=4,m=4}", "n"),
    ],
)
def test_bad_pipelines_fail_before_loading(tmp_path, capsys, passes, needle):
    out = tmp_path / "out"
    # The model path does not exist: parsing must fail first, so the message is about the pipeline.
    code, err = _run(capsys, "compile", str(tmp_path / "nowhere"), "--passes", passes, "-o", str(out))
    _assert_one_clear_line(code, err, needle)
    assert not out.exists()


def test_existing_output_needs_force(tmp_path, capsys, llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(
        capsys, "compile", str(llama_dir), "--passes", "sparsity{method=magnitude}", "-o", str(out)
    )
    _assert_one_clear_line(code, err, "exists; pass --force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_inside_the_model_folder_is_refused(capsys, llama_dir):
    before = _hashes(llama_dir)
    code, err = _run(capsys, "compile", str(llama_dir), "-o", str(llama_dir / "out"))
    _assert_one_clear_line(code, err, "overlaps the input model")
    assert _hashes(llama_dir) == before


def test_missing_and_short_calibration(tmp_path, capsys, llama_dir):
    out = tmp_path / "out"
    argv = ["compile", str(llama_dir), "--passes", "mask-2to4{method=wanda}", "-o", str(out), "--no-bench"]
    code, err = _run(capsys, *argv, "--calib", str(tmp_path / "missing.txt"))
    _assert_one_clear_line(code, err, "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    code, err = _run(capsys, *argv, "--calib", str(short), "--seq-len", "64")
    _assert_one_clear_line(code, err, "too short")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_method_that_needs_calibration_says_so(tmp_path, capsys, llama_dir):
    out = tmp_path / "out"
    code, err = _run(
        capsys, "compile", str(llama_dir), "--passes", "mask-2to4{method=sparsegpt}", "-o", str(out)
    )
    _assert_one_clear_line(code, err, "--calib")
    assert not out.exists()


def test_backend_options_are_typed_and_validated(tmp_path, capsys):
    from slmopt.cli import _key_values

    assert _key_values(["external_data=True", "opset=18", "fff_lowering=ops"]) == {
        "external_data": True, "opset": 18, "fff_lowering": "ops"
    }  # fmt: skip
    code, err = _run(capsys, "compile", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"),
                     "--backend-option", "external_data")  # fmt: skip
    _assert_one_clear_line(code, err, "expects key=value")
