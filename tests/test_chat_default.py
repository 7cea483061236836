"""`tinyq chat` with no --model uses the cached AWQ checkpoint of the embedded default."""
import io
import sys

import pytest

import tinyq.quant.default_awq as default_awq
from tests.tiny_models import make_model_dir
from tinyq.cli import main


@pytest.mark.parametrize("quant,expect_awq", [("awq", True), ("rtn", False)])
def test_default_chat_uses_awq_checkpoint(tmp_path, monkeypatch, capsys, quant, expect_awq):
    make_model_dir(tmp_path / "tiny", "llama", seed=1)
    calls = []

    def fake_ensure(group_size=64, device=None, progress=True):
        calls.append(group_size)
        return tmp_path / "tiny"

    monkeypatch.setattr(default_awq, "ensure_default_awq_checkpoint", fake_ensure)
    import tinyq.models as models

    real_load = models.load_model
    loaded = []

    def spy_load(path, **kw):
        loaded.append(path)
        if path == "default":  # RTN of the real default is covered by test_gguf; keep this test fast
            path = str(tmp_path / "tiny")
        return real_load(path, **kw)

    monkeypatch.setattr(models, "load_model", spy_load)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/exit\n"))
    rc = main(["chat", "--quant", quant, "--temperature", "0", "--max-new-tokens", "3", "--max-seq-len", "128",
               "--device", "cpu"])
    assert rc == 0
    assert (calls == [64]) == expect_awq
    assert loaded == [str(tmp_path / "tiny")] if expect_awq else loaded == ["default"]
    assert "assistant> " in capsys.readouterr().out


def test_default_chat_replaces_a_damaged_cache(tmp_path, monkeypatch, capsys):
    """A zero-byte model.safetensors in the cache stopped every `tinyq chat` with a load error; now the
    cache is named as unusable, quantized again (a tiny checkpoint here, not the 40-s search) and the
    chat starts."""
    from tinyq.models import gguf
    from tinyq.quant import checkpoint as ck

    model, tokenizer = make_model_dir(tmp_path / "tiny", "llama", seed=1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "default_model_path", lambda: "SmolLM2.gguf")
    calls = []

    def fake_quantize(job, out_dir, fmt="tinyq", replace=True):
        calls.append(out_dir)
        extra = {k: v for k, v in default_awq.recipe(job).items() if k in ("method", "n_grid", "calibration")}
        ck.save_quantized(model, out_dir, job.awq.group_size, tokenizer, quant_extra=extra, replace=replace)

    monkeypatch.setattr(default_awq, "quantize_to_checkpoint", fake_quantize)
    cached = default_awq.ensure_default_awq_checkpoint(64)
    (cached / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/exit\n"))
    rc = main(["chat", "--temperature", "0", "--max-new-tokens", "3", "--max-seq-len", "128", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"the cached AWQ default model at {cached} is unusable" in err and "model.safetensors: not a readable safetensors file" in err
    assert calls == [cached, cached] and "assistant> " in out
