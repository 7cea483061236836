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
