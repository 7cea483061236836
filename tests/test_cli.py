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


def _answers(out):
    return [line.split("assistant> ", 1)[1] for line in out.splitlines() if line.startswith("assistant> ")]


def test_chat_two_turns_reset_exit(model_dir):
    p = _run(["chat", "--model", model_dir, "--precision", "fp32", "--temperature", "0", "--max-new-tokens", "6",
              "--max-seq-len", "128"], "hello\nhello\n/reset\nhello\n/exit\nnot read\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count("assistant> ") == 3
    assert out.count("ms/token") == 3 and "TTFT" in out
    assert "(conversation reset)" in out
    assert "not read" not in out
    # The same question three times. The second is asked with the first turn in the cache (prefill
    # counts the new turn's tokens only, which then include the end of the previous answer); after
    # /reset the question is prefilled from an empty context again, exactly like the first time.
    prefills = [line.split("(")[1].split(" prompt")[0] for line in out.splitlines() if line.startswith("[TTFT")]
    assert prefills[1] != prefills[0]
    assert prefills[2] == prefills[0]
    answers = _answers(out)
    assert answers[2] == answers[0]


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
    # said in the chat's terms, not the Python API's
    assert "more than --max-seq-len 96" in p.stdout and "drop_oldest_turns()" not in p.stdout


def test_chat_bad_arguments():
    p = _run(["chat", "--model", "/no/such/model"], "")
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = _run(["chat", "--model", "/no/such/model", "--top-p", "2"], "")
    assert p.returncode == 2 and "top_p" in p.stderr
    # a device this torch cannot use: a one-line error before anything loads (CPU-only torch here)
    for device, says in (("foo", "is not a device torch knows"), ("cuda", "this torch sees no CUDA GPU")):
        if device == "cuda" and __import__("torch").cuda.is_available():
            continue
        p = _run(["chat", "--model", "/no/such/model", "--device", device], "")
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr


def test_chat_without_tokenizer_says_what_is_missing(model_dir, tmp_path):
    for name in os.listdir(model_dir):
        if not name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            os.symlink(os.path.join(model_dir, name), tmp_path / name)
    args = ["chat", "--model", str(tmp_path), "--precision", "fp32", "--max-new-tokens", "2"]
    p = _run(args, "/exit\n")
    assert p.returncode == 2 and "has no tokenizer" in p.stderr and "--tokenizer" in p.stderr, p.stderr
    p = _run(args + ["--tokenizer", model_dir], "/exit\n")
    assert p.returncode == 0 and "ready:" in p.stdout, p.stderr


def test_chat_keeps_history_when_the_message_alone_cannot_fit(model_dir):
    """Choosing [d]rop or [r]eset for a message longer than the whole context keeps the history (the
    next turn is still answered with it); unknown slash commands are not sent to the model."""
    p = _run(["chat", "--model", model_dir, "--precision", "fp32", "--temperature", "0", "--max-new-tokens", "4",
              "--max-seq-len", "64"], "hi\n" + "word " * 60 + "\nd\n/rest\nhi\n")
    assert p.returncode == 0, p.stderr
    assert "this message alone needs" in p.stdout and "the history is kept" in p.stdout
    assert "unknown command /rest" in p.stdout
    assert p.stdout.count("assistant> ") == 2


def test_chat_takes_bytes_that_are_not_utf8(model_dir):
    """Input that is not UTF-8 (a pipe, a --system prompt) is read with replacement characters,
    never a traceback that ends the chat."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for extra_env in ({}, {"PYTHONIOENCODING": "utf-8"}):
        p = subprocess.run([sys.executable, "-m", "tinyq", "chat", "--model", model_dir, "--precision", "fp32",
                            "--temperature", "0", "--max-new-tokens", "3", "--max-seq-len", "128",
                            "--system", "be \udcff brief"],
                           input=b"hello\nhi \xff\xfe there\n", capture_output=True, timeout=120,
                           env=dict(env, **extra_env), cwd=ROOT)
        assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
        assert p.stdout.count(b"assistant> ") == 2


def test_chat_refuses_a_tokenizer_without_chat_template(model_dir, tmp_path):
    for name in os.listdir(model_dir):
        if name != "chat_template.jinja":
            os.symlink(os.path.join(model_dir, name), tmp_path / name)
    if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):  # the template may live in here too
        import json

        cfg = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
        cfg.pop("chat_template", None)
        os.unlink(tmp_path / "tokenizer_config.json")
        json.dump(cfg, open(tmp_path / "tokenizer_config.json", "w"))
    p = _run(["chat", "--model", str(tmp_path), "--precision", "fp32"], "hi\n")
    assert p.returncode == 2 and "has no chat template" in p.stderr, p.stderr
    p = _run(["chat", "--group-size", "0"], "")
    assert p.returncode == 2 and "--group-size must be one of" in p.stderr


def test_ctrl_c_at_the_context_full_prompt_cancels(capsys):
    """Ctrl-C at "[r]eset, [d]rop or [c]ancel?" keeps the session (and the history) going."""
    from tinyq.commands.chat import _answer
    from tinyq.generate import ContextOverflowError

    class FullSession:
        turns, resets, max_seq_len = 3, 0, 64

        def prompt_ids(self, text):
            return [0] * 80

        def send(self, text):
            raise ContextOverflowError("too long")

        def reset(self):
            self.resets += 1

    class CtrlC:
        def read(self, prompt):
            raise KeyboardInterrupt

    session = FullSession()
    try:
        assert _answer(session, "hi", CtrlC()) is True
    except KeyboardInterrupt:  # would end the chat (and this test run)
        pytest.fail("Ctrl-C at the prompt escaped the chat loop")
    assert session.turns == 3 and session.resets == 0
    out = capsys.readouterr().out
    assert "needs 81 tokens, more than --max-seq-len 64" in out and "(cancelled; the history is kept)" in out



def test_a_turn_that_fails_mid_answer_keeps_the_chat_going(model_dir, monkeypatch, capsys):
    """NaN logits (an overflowing model) in the middle of an answer: the chat says so and goes on
    with the history as it was (the session rolled the turn back), instead of exiting with a traceback."""
    from tinyq.chat import ChatSession
    from tinyq.commands.chat import _loop
    from tinyq.models import load_model

    model, tok = load_model(model_dir, precision="fp32", device="cpu")
    session = ChatSession(model, tok, max_seq_len=128, max_new_tokens=6, temperature=0)
    real = type(model).forward
    overflow = {"on": False, "calls": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        overflow["calls"] += 1
        return out * float("nan") if overflow["on"] and overflow["calls"] > 2 else out  # after prefill + 1 step

    monkeypatch.setattr(type(model), "forward", forward)

    class Lines:
        lines = iter(["hello", "overflow now", "and again", "/exit"])

        def read(self, prompt):
            line = next(self.lines)
            overflow.update(on=line == "overflow now", calls=0)
            return line

    assert _loop(session, Lines()) == 0
    out = capsys.readouterr().out
    assert "error: the model's logits are NaN" in out and "[this turn was discarded; the history is kept]" in out
    assert out.count("[TTFT") == 2
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello", "and again"]
    assert session.gen.cache.length == len(session.gen.cached_ids)


def test_every_command_is_registered(monkeypatch):
    """All commands are there; a missing command module is an error, not silently skipped."""
    import tinyq.cli as cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(cli.COMMANDS) == {"chat", "quantize", "eval"}
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("nope",))
    with pytest.raises(ModuleNotFoundError, match="tinyq.commands.nope"):
        cli.build_parser()
