"""Fuzzing the inputs of an unattended export job: every case is a clean result or one clear error.

Inputs: pipeline strings and option values, calibration/eval files (empty, binary, huge lines, wrong
encoding, arrays of any dtype/shape), model folders with missing/extra/corrupt files or a config that does
not match the weights, and ``.pt2``/output folders that are not what they claim. Each case asserts: exit
code 0 or 2, on 2 exactly one stderr line starting ``slmopt: error:``, never a traceback, and no output
folder left behind by a failed compile.

Profiles (hypothesis settings, chosen by ``SLMOPT_FUZZ``): ``fast`` (default, CI: few derandomized
examples per test) and ``long`` (local: many random examples), e.g.
``SLMOPT_FUZZ=long .venv/bin/pytest -q tests/core/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slmopt.cli import main
from slmopt.data.windows import DataSpec, load_tokens
from slmopt.pipeline.parse import parse_pipeline
from slmopt.pipeline.pass_base import all_pass_names, config_fields, get_pass_class

_COMMON = {"deadline": None, "suppress_health_check": list(HealthCheck), "database": None}
# name -> (cheap in-process cases, cases that load a model); "long" is for local runs (see ROBUSTNESS.md).
# Each profile states derandomize: hypothesis loads its "ci" profile (derandomized) when CI is set, and an
# unstated field would inherit it.
PROFILES = {
    "fast": settings(max_examples=40, derandomize=True, **_COMMON),
    "long": settings(max_examples=1000, derandomize=False, **_COMMON),
}
PROFILES_MODEL = {
    "fast": settings(max_examples=5, derandomize=True, **_COMMON),
    "long": settings(max_examples=150, derandomize=False, **_COMMON),
}


def select_profile(environ: Mapping[str, str]) -> str:
    """The profile ``SLMOPT_FUZZ`` names (default ``fast``); an unknown name is an error, not a silent default."""
    name = environ.get("SLMOPT_FUZZ", "fast")
    if name not in PROFILES:
        raise ValueError(f"SLMOPT_FUZZ must be one of {sorted(PROFILES)}, got {name!r}")
    return name


PROFILE = select_profile(os.environ)
FUZZ, FUZZ_MODEL = PROFILES[PROFILE], PROFILES_MODEL[PROFILE]
VOCAB = 256


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors (e.g. a pipeline string starting with "-")
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_clean(code: int, err: str) -> None:
    """Exit 0, or exit 2 with exactly one ``slmopt: error:`` line; never a traceback."""
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("slmopt: error:"), err


# ------------------------------------------------------------------------------------------ pipelines
PASS_NAMES = all_pass_names()
_PIPE_ALPHABET = string.ascii_lowercase + string.digits + "{}=,.-_ :;\"'[]()\\/*+\n\t\x00é"
VALUES = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["none", "true", "false", "", "1,2", "0.5,1.5", "inf", "-0", "1e400", "{", "}", "="]),
    st.text(_PIPE_ALPHABET, max_size=12),
)


@st.composite
def pipeline_items(draw) -> str:
    name = draw(st.sampled_from([*PASS_NAMES, "prune", "sparsity", "nope"]))
    options = [f for f, *_ in config_fields(get_pass_class(name).Config)] if name in PASS_NAMES else []
    keys = st.sampled_from([*options, "bogus"]) if options else st.just("bogus")
    pairs = draw(st.lists(st.tuples(keys, VALUES), max_size=3))
    body = ",".join(f"{k}={v}" for k, v in pairs)
    return f"{name}{{{body}}}" if pairs or draw(st.booleans()) else name


PIPELINES = st.one_of(
    st.text(_PIPE_ALPHABET, max_size=40),
    st.lists(pipeline_items(), min_size=1, max_size=3).map(",".join),
)


@FUZZ
@given(text=PIPELINES)
def test_pipeline_strings_parse_or_fail_with_value_error(text):
    try:
        pipeline = parse_pipeline(text)
    except ValueError as err:
        assert str(err).strip()
        return
    canonical = str(pipeline)
    assert str(parse_pipeline(canonical)) == canonical  # the canonical form round-trips


@FUZZ
@given(text=PIPELINES)
def test_cli_pipeline_errors_are_one_line_and_write_nothing(tmp_path_factory, capsys, text):
    assume("\x00" not in text)  # argv cannot carry NUL bytes
    tmp = tmp_path_factory.mktemp("pipe")
    out = tmp / "out"
    code, _, err = run_cli(capsys, ["compile", str(tmp / "nowhere"), "--passes", text, "-o", str(out)])
    assert code == 2  # either the pipeline is bad, or (parsed fine) the model does not exist
    assert_clean(code, err)
    assert not out.exists() and list(tmp.iterdir()) == []


# ------------------------------------------------------------------------------------------ data files
TEXTS = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    st.text(max_size=200).map(lambda t: t.encode("utf-16")),
    st.text(string.printable, max_size=200).map(lambda t: t.encode("latin-1")),
    st.integers(1, 300_000).map(lambda n: b"x" * n),  # one huge line
    st.just(b"\xef\xbb\xbf"),  # a BOM and nothing else
)
DTYPES = st.sampled_from(["int64", "int32", "uint8", "int8", "float32", "float16", "bool", "complex64"])


@st.composite
def data_files(draw, folder: Path) -> Path:
    kind = draw(st.sampled_from(["text", "npy", "pt", "garbage-npy", "garbage-pt"]))
    text_suffix = draw(st.sampled_from([".txt", ".csv", ""]))
    suffix = {"text": text_suffix, "npy": ".npy", "pt": ".pt", "garbage-npy": ".npy", "garbage-pt": ".pt"}
    path = folder / f"data{suffix[kind]}"
    if kind in ("text", "garbage-npy", "garbage-pt"):
        path.write_bytes(draw(TEXTS))
        return path
    shape = draw(st.lists(st.integers(0, 70), min_size=0, max_size=3))
    values = np.random.default_rng(draw(st.integers(0, 99))).integers(-3, 300, size=shape)
    arr = values.astype(draw(DTYPES))
    if kind == "npy":
        np.save(path, arr)
    else:
        torch.save(torch.from_numpy(np.ascontiguousarray(arr)), path)
    return path


@FUZZ
@given(data=st.data(), seq_len=st.integers(1, 64), samples=st.integers(1, 8))
def test_calibration_files_load_correctly_or_fail_with_value_error(tmp_path_factory, data, seq_len, samples):
    path = data.draw(data_files(tmp_path_factory.mktemp("calib")))
    try:
        rows = load_tokens(DataSpec(str(path), seq_len=seq_len, num_samples=samples), byte_level=True,
                           vocab_size=VOCAB)  # fmt: skip
    except ValueError as err:
        assert str(err).strip()
        return
    assert rows.dtype == torch.int64 and rows.dim() == 2
    assert 1 <= rows.shape[0] <= samples and rows.shape[1] == seq_len
    assert int(rows.min()) >= 0 and int(rows.max()) < VOCAB
    if path.suffix not in (".npy", ".pt"):  # byte-level text: every window is a slice of the file
        raw = path.read_bytes()
        for row in rows[:2]:
            assert bytes(row.tolist()) in raw


# ------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 256-symbol vocabulary and no tokenizer: a byte-level model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    folder = tmp_path_factory.mktemp("fuzz") / "byte_llama"
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@FUZZ_MODEL
@given(data=st.data())
def test_eval_data_files_end_to_end(tmp_path_factory, capsys, byte_model, data):
    path = data.draw(data_files(tmp_path_factory.mktemp("eval")))
    argv = ["eval", str(byte_model), "--data", str(path), "--seq-len", "8", "--samples", "2", "--no-progress"]
    code, out, err = run_cli(capsys, argv)
    assert_clean(code, err)
    if code == 0:
        result = json.loads(out)
        assert result["eval_windows"] >= 1


CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "max_position_embeddings", "model_type", "architectures", "head_dim",
               "rms_norm_eps", "tie_word_embeddings", "torch_dtype"]  # fmt: skip
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.sampled_from([10**12, 2**31, 0, -1]),
    st.floats(allow_nan=False), st.text(max_size=8), st.sampled_from(["gpt2", "bert", "llama", "qwen2"]),
    st.lists(st.text(max_size=6), max_size=2),
)  # fmt: skip


@st.composite
def model_mutations(draw, base: Path, folder: Path) -> str:
    """Copies ``base`` into ``folder`` and breaks it one way; returns a label of what was done."""
    shutil.copytree(base, folder)
    files = sorted(p.name for p in folder.iterdir())
    kind = draw(st.sampled_from(["delete", "extra", "truncate", "flip", "config-value", "config-bytes"]))
    weights = folder / "model.safetensors"
    if kind == "delete":
        name = draw(st.sampled_from(files))
        (folder / name).unlink()
        return f"delete {name}"
    if kind == "extra":
        name = draw(st.sampled_from(["pytorch_model.bin", "extra.safetensors", "notes.txt", "x.json"]))
        (folder / name).write_bytes(draw(st.binary(max_size=64)))
        return f"extra {name}"
    if kind in ("truncate", "flip"):
        raw = bytearray(weights.read_bytes())
        at = draw(st.integers(0, len(raw) - 1))
        if kind == "truncate":
            weights.write_bytes(bytes(raw[:at]))
        else:
            raw[at] ^= draw(st.integers(1, 255))
            weights.write_bytes(bytes(raw))
        return f"{kind} at {at}"
    config = folder / "config.json"
    if kind == "config-bytes":
        config.write_bytes(draw(TEXTS))
        return "config bytes"
    cfg = json.loads(config.read_text())
    key = draw(st.sampled_from(CONFIG_KEYS))
    cfg[key] = draw(JSON_VALUES)
    config.write_text(json.dumps(cfg))
    return f"config {key}={cfg[key]!r}"


@FUZZ_MODEL
@given(data=st.data())
def test_broken_model_folders(tmp_path_factory, capsys, byte_model, data):
    folder = tmp_path_factory.mktemp("broken") / "model"
    label = data.draw(model_mutations(byte_model, folder))
    code, out, err = run_cli(capsys, ["inspect", str(folder), "-q"])
    assert_clean(code, err)
    if code == 0:
        assert "blocks" in out, (label, out)


@pytest.mark.parametrize(
    "claim", ["random", "text", "zip-junk", "onnx", "truncated-pt2", "pt2-folder", "output-no-manifest"]
)
def test_files_that_are_not_what_they_claim(tmp_path, capsys, byte_model, claim):
    """``.pt2``/ONNX/output-folder impostors: one clear error each, never a traceback."""
    rng = np.random.default_rng(0)
    target = tmp_path / "model.pt2"
    if claim == "random":
        target.write_bytes(rng.bytes(2048))
    elif claim == "text":
        target.write_text("this is not a program\n")
    elif claim == "zip-junk":
        with zipfile.ZipFile(target, "w") as z:
            z.writestr("archive_format", "pt2")
            z.writestr("models/model.json", "{not json")
    elif claim == "onnx":
        import onnx
        from onnx import helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])  # fmt: skip
        onnx.save(helper.make_model(graph), target)  # a valid ONNX file, misnamed .pt2
        shutil.copy(target, tmp_path / "model.onnx")
        code, _, err = run_cli(capsys, ["inspect", str(tmp_path / "model.onnx")])
        assert code == 2 and "unsupported model file" in err
        assert_clean(code, err)
    elif claim == "truncated-pt2":
        from tests.core.test_safe_loading import _save_pt2

        data = _save_pt2(tmp_path / "good.pt2").read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif claim == "pt2-folder":
        target.mkdir()
        (target / "config.json").write_text("{}")
    else:  # an output folder without its manifest, holding a garbage model.onnx
        target = tmp_path / "out"
        target.mkdir()
        (target / "model.onnx").write_bytes(rng.bytes(512))
    out = tmp_path / "compiled"
    for argv in (["inspect", str(target)], ["compile", str(target), "-o", str(out)]):
        code, _, err = run_cli(capsys, argv)
        assert code == 2, err
        assert_clean(code, err)
        assert not out.exists()


@pytest.mark.parametrize("breakage", ["manifest-json", "manifest-keys", "onnx-bytes", "onnx-missing"])
def test_corrupt_output_folder_for_eval(tmp_path, capsys, byte_model, breakage):
    """``slmopt eval OUT`` on a damaged output folder: exit 2 with one line."""
    from slmopt.lowering import MANIFEST

    out = tmp_path / "out"
    out.mkdir()
    manifest = {"backend": "onnxruntime", "artifacts": {"onnx": "model.onnx"}, "pipeline": "",
                "model": {"kind": "causal-lm", "source": "x", "vocab_size": VOCAB, "byte_level": True}}  # fmt: skip
    (out / "model.onnx").write_bytes(np.random.default_rng(0).bytes(256))
    if breakage == "manifest-json":
        (out / MANIFEST).write_text("{oops")
    elif breakage == "manifest-keys":
        (out / MANIFEST).write_text(json.dumps({"backend": "onnxruntime"}))
    else:
        (out / MANIFEST).write_text(json.dumps(manifest))
        if breakage == "onnx-missing":
            (out / "model.onnx").unlink()
    data = tmp_path / "heldout.txt"
    data.write_text("hello world, " * 20)
    code, _, err = run_cli(capsys, ["eval", str(out), "--data", str(data), "--seq-len", "8"])
    assert code == 2, err
    assert_clean(code, err)


def test_huge_calibration_line_is_read_without_error(tmp_path):
    """A single 2 MB line (no newline) is a valid byte-level calibration file: windows are slices of it."""
    raw = bytes(np.random.default_rng(1).integers(97, 123, size=2_000_000, dtype=np.uint8))
    path = tmp_path / "one_line.txt"
    path.write_bytes(raw)
    rows = load_tokens(DataSpec(str(path), seq_len=128, num_samples=4), byte_level=True, vocab_size=VOCAB)
    assert rows.shape == (4, 128)
    for row in rows:
        assert bytes(row.tolist()) in raw


def test_profile_is_selected_by_environment():
    """The variable picks the profile; the default is the small derandomized CI one; a typo is an error.
    (Before issue 15 this test only restated the module's own assignments and could not fail.)"""
    assert select_profile({}) == "fast" and select_profile({"SLMOPT_FUZZ": "long"}) == "long"
    with pytest.raises(ValueError, match="SLMOPT_FUZZ must be one of"):
        select_profile({"SLMOPT_FUZZ": "longg"})
    fast, long = PROFILES["fast"], PROFILES["long"]
    assert fast.derandomize and not long.derandomize and fast.max_examples < long.max_examples
    assert PROFILES_MODEL["fast"].max_examples < PROFILES_MODEL["long"].max_examples
    assert FUZZ is PROFILES[select_profile(os.environ)]  # the decorators use what the environment names
