"""``python -m tinyq chat`` driven through stdin on a tiny model."""
import os
import subprocess
import sys

import pytest

from tests.tiny_models import make_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, stdin):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "tinyq", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_model_dir(path, "llama", seed=2)
    return str(path)


def test_chat_two_turns_reset_exit(model_dir):
    p = _run(["chat", "--model", model_dir, "--precision", "fp32", "--temperature", "0", "--max-new-tokens", "6",
              "--max-seq-len", "128"], "hello\nhow are you?\n/reset\nagain\n/exit\nnot read\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count("assistant> ") == 3
    assert out.count("ms/token") == 3 and "TTFT" in out
    assert "(conversation reset)" in out
    assert "not read" not in out
    # after /reset the first question is answered from an empty context again: same prefill size
    prefills = [line.split("(")[1].split(" prompt")[0] for line in out.splitlines() if line.startswith("[TTFT")]
    assert prefills[0] != prefills[1]


def test_chat_reports_load_and_warmup_separately(model_dir):
    p = _run(["chat", "--model", model_dir, "--precision", "fp32", "--temperature", "0", "--max-new-tokens", "4",
              "--max-seq-len", "128"], "hi\n/exit\n")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    load = [i for i, line in enumerate(lines) if line.startswith("loaded: ") and " in " in line]
    warm = [i for i, line in enumerate(lines) if line.startswith("ready: warm-up ")]
    answer = [i for i, line in enumerate(lines) if line.startswith("assistant> ")]
    assert load and warm and answer and load[0] < warm[0] < answer[0], p.stdout


def test_chat_overflow_then_eof(model_dir):
    p = _run(["chat", "--model", model_dir, "--precision", "fp32", "--temperature", "0", "--max-new-tokens", "4",
              "--max-seq-len", "96"], "hi\n" + "word " * 12 + "\nd\n")  # 103 tokens with history, 77 alone
    assert p.returncode == 0, p.stderr
    assert "[context full]" in p.stdout and p.stdout.count("assistant> ") == 2


def test_chat_bad_arguments():
    p = _run(["chat", "--model", "/no/such/model"], "")
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = _run(["chat", "--model", "/no/such/model", "--top-p", "2"], "")
    assert p.returncode == 2 and "top_p" in p.stderr
