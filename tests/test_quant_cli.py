"""``tinyq quantize`` / ``tinyq eval`` end to end on a tiny random model directory (CPU)."""
import json
import math
from pathlib import Path

import pytest
from awq_tiny_models import random_text, save_tiny_model_dir

from tinyq.commands import eval as eval_cmd
from tinyq.commands import quantize as quantize_cmd
from tinyq.quant.checkpoint import SEARCH_RESULTS


def _cli(module, argv):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    return module.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_dir(root / "fp", "llama")
    (root / "calib.txt").write_text(random_text(3000, seed=1))
    (root / "eval.txt").write_text(random_text(800, seed=2))
    return root


CALIB = ["--calib-blocks", "8", "--calib-len", "64", "--search-blocks", "2", "--quiet"]


@pytest.mark.parametrize("method,fmt", [("awq", "tinyq"), ("rtn", "awq")])
def test_quantize_then_eval(model_dir, tmp_path, capsys, method, fmt):
    out = tmp_path / "ckpt"
    calib_flags = [f for f in CALIB if f != "--quiet"]  # keep the progress output
    argv = ["quantize", "--model", str(model_dir / "fp"), "--method", method, "--group-size", "32", "--format", fmt,
            "--out", str(out), "--calib-file", str(model_dir / "calib.txt"), *calib_flags]
    assert _cli(quantize_cmd, argv) == 0
    captured = capsys.readouterr()
    assert f"to {out}" in captured.out
    assert (f"AWQ search results: {out}/{SEARCH_RESULTS}" in captured.out) == (method == "awq")
    if method == "awq":
        assert "] AWQ layers 2/2" in captured.err and "calibration: 8 blocks x 64 tokens" in captured.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == ("awq" if fmt == "awq" else "tinyq")
    assert (out / SEARCH_RESULTS).is_file() == (method == "awq")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # what vLLM's loader globs
    ppl = {}
    for backend in ("transformers", "tinyq"):  # transformers modules with W4A16Linear, and tinyq's own models
        argv = ["eval", "--model", str(out), "--ppl-file", str(model_dir / "eval.txt"), "--window", "64",
                "--backend", backend, "--json", "--quiet"]
        assert _cli(eval_cmd, argv) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["windows"] == 800 // 64 and math.isfinite(result["perplexity"]) and result["perplexity"] > 1
        ppl[backend] = result["perplexity"]
    assert ppl["tinyq"] == pytest.approx(ppl["transformers"], rel=1e-3)


def test_eval_fake_quant_w3_and_saved_search(model_dir, tmp_path, capsys):
    search = tmp_path / "s.safetensors"
    base = ["--model", str(model_dir / "fp"), "--calib-file", str(model_dir / "calib.txt"), *CALIB]
    assert _cli(quantize_cmd, ["quantize", "--w-bit", "3", "--group-size", "64", "--save-search", str(search), *base]) == 0
    capsys.readouterr()
    ppl = {}
    for mode in (["--fake-quant", "none"], ["--fake-quant", "rtn"], ["--fake-quant", "awq", "--load-search", str(search)]):
        argv = ["eval", "--ppl-file", str(model_dir / "eval.txt"), "--window", "64", "--max-windows", "5",
                "--w-bit", "3", "--group-size", "64", "--backend", "transformers", "--json", *mode, *base]
        assert _cli(eval_cmd, argv) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["windows"] == 5
        ppl[mode[1]] = out["perplexity"]
    assert ppl["none"] != ppl["rtn"] and all(math.isfinite(v) for v in ppl.values())
    # a saved search for other settings is refused
    argv = ["eval", "--ppl-file", str(model_dir / "eval.txt"), "--fake-quant", "awq", "--load-search", str(search),
            "--w-bit", "4", "--group-size", "64", "--backend", "transformers", *base]
    assert _cli(eval_cmd, argv) == 2
    assert "w_bit=3, not 4" in capsys.readouterr().err


def test_bad_inputs(model_dir, tmp_path, capsys):
    fp = str(model_dir / "fp")
    short = tmp_path / "short.txt"
    short.write_text(random_text(50))
    assert _cli(quantize_cmd, ["quantize", "--model", fp, "--out", str(tmp_path / "o"), "--calib-file", str(short),
                               *CALIB]) == 2
    assert "calibration text" in capsys.readouterr().err and not (tmp_path / "o").exists()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert _cli(quantize_cmd, ["quantize", "--model", str(gpt2), "--out", str(tmp_path / "o"), *CALIB]) == 2
    assert "LlamaForCausalLM, Qwen2ForCausalLM" in capsys.readouterr().err
    assert _cli(quantize_cmd, ["quantize", "--model", fp, "--w-bit", "3", "--out", str(tmp_path / "o"), *CALIB]) == 2
    assert "3-bit AWQ is for evaluation only" in capsys.readouterr().err
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("x")
    assert _cli(quantize_cmd, ["quantize", "--model", fp, "--out", str(tmp_path / "keep"), *CALIB]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    # --out naming the model itself (a float model directory) loses nothing
    before = sorted(p.name for p in Path(fp).iterdir())
    for method in ("rtn", "smoothquant"):
        assert _cli(quantize_cmd, ["quantize", "--model", fp, "--method", method, "--out", fp, *CALIB]) == 2
        assert "is the model being quantized" in capsys.readouterr().err
    assert sorted(p.name for p in Path(fp).iterdir()) == before
    assert _cli(eval_cmd, ["eval", "--model", fp, "--ppl-file", str(short), "--window", "512", "--quiet",
                           "--backend", "transformers"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    for flag, value, least in (("--window", "1", 2), ("--batch", "0", 1), ("--max-windows", "0", 1)):
        assert _cli(eval_cmd, ["eval", "--model", str(tmp_path / "nothing"), "--ppl-file", str(short), flag, value,
                               "--quiet"]) == 2
        assert f"{flag} must be at least {least}, got {value}" in capsys.readouterr().err
    # flags the method would ignore, and a search file whose folder is missing, stop before any work
    for extra, message in ((["--method", "rtn", "--save-search", str(tmp_path / "s.st")], "for --method awq only"),
                           (["--method", "smoothquant", "--w-bit", "3"], "smoothquant writes int8 weights"),
                           (["--save-search", str(tmp_path / "no" / "s.st")], "its folder does not exist")):
        assert _cli(quantize_cmd, ["quantize", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                                   *extra]) == 2
        assert message in capsys.readouterr().err


def test_search_and_output_paths_are_checked_before_the_model_loads(tmp_path, capsys):
    """A --save-search that is a directory, a --load-search that is missing or not safetensors, or
    for other settings, and an --out that cannot be created are refused before any work: --model
    names nothing here, so an error about it would mean the model was loaded first."""
    from tinyq.quant.awq import AwqResults

    nothing = str(tmp_path / "nothing")
    (tmp_path / "searches").mkdir()
    (tmp_path / "notes.txt").write_text("not safetensors")
    AwqResults({"w_bit": 4, "group_size": 64}, "llama", 2).save(tmp_path / "g64.safetensors")
    out = ["--out", str(tmp_path / "o")]
    cases = [
        (["--save-search", str(tmp_path / "searches"), *out], "--save-search {p}/searches is a directory; name a file"),
        (["--save-search", str(tmp_path / "searches")], "--save-search {p}/searches is a directory"),  # search only
        (["--load-search", str(tmp_path / "missing.safetensors"), *out], "No such file or directory: {p}/missing"),
        (["--load-search", str(tmp_path / "notes.txt"), *out], "{p}/notes.txt: not a safetensors file"),
        (["--load-search", str(tmp_path / "g64.safetensors"), "--group-size", "32", *out],
         "search results are for group_size=64, not 32"),
        (["--out", str(tmp_path / "notes.txt" / "ckpt")], "{p}/notes.txt is a file, not a folder"),
    ]
    for extra, message in cases:
        assert _cli(quantize_cmd, ["quantize", "--model", nothing, *extra, *CALIB]) == 2, extra
        err = capsys.readouterr().err
        assert message.format(p=tmp_path) in err and "nothing" not in err, err
    for extra, message in cases[:4]:
        argv = ["eval", "--model", nothing, "--ppl-file", str(tmp_path / "notes.txt"), "--fake-quant", "awq",
                *[a for a in extra if a not in out], *CALIB]
        assert _cli(eval_cmd, argv) == 2, extra
        err = capsys.readouterr().err
        assert message.format(p=tmp_path) in err and "nothing" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g64.safetensors", "notes.txt", "searches"]


def test_a_failed_search_save_names_the_destination(model_dir, tmp_path, monkeypatch, capsys):
    """A save that fails after the search (a full disk) is an error naming --save-search's file, not
    the temporary file it was written to; nothing is left behind."""
    import errno

    from tinyq.quant import awq

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".tmp-x"))

    monkeypatch.setattr(awq.AwqResults, "save", full_disk)
    search = tmp_path / "s.safetensors"
    argv = ["quantize", "--model", str(model_dir / "fp"), "--group-size", "32", "--save-search", str(search),
            "--calib-file", str(model_dir / "calib.txt"), *CALIB]
    assert _cli(quantize_cmd, argv) == 2
    err = capsys.readouterr().err
    assert f"could not write the AWQ search results to {search}: No space left on device" in err, err
    assert ".tmp-x" not in err and not search.exists()


@pytest.mark.parametrize("backend", ["transformers", "tinyq"])
def test_eval_of_a_truncated_checkpoint_is_a_one_line_error(model_dir, tmp_path, capsys, backend):
    """``tinyq eval --backend transformers`` once died with a traceback from safetensors naming no file."""
    from awq_tiny_models import tiny_model, word_tokenizer

    from tinyq.quant.checkpoint import save_quantized

    path = save_quantized(tiny_model("llama"), tmp_path / "q", 32, word_tokenizer(), max_shard_bytes=64 * 1024)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    assert _cli(eval_cmd, ["eval", "--model", str(path), "--ppl-file", str(model_dir / "eval.txt"), "--window", "32",
                           "--backend", backend, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyq eval: error: ") and err.count("\n") == 1
    assert f"{shard}: not a readable safetensors file, truncated or corrupt?" in err


def test_eval_of_a_missing_ppl_file_does_not_call_it_calibration_text(model_dir, tmp_path, capsys):
    """A missing text file is the one line on stderr: it is read before the model is loaded."""
    missing = tmp_path / "missing.txt"
    assert _cli(eval_cmd, ["eval", "--model", str(model_dir / "fp"), "--ppl-file", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"tinyq eval: error: text file {missing} does not exist"], err
