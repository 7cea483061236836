"""``python -m tinyq chat``: an interactive terminal chat with streaming output.

With no arguments it loads the embedded SmolLM2-135M-Instruct (W4A16, group 64) and runs on the
GPU if there is one, else the CPU. Lines are read from the terminal, or from stdin line by line
when it is not a terminal (that is how the tests drive it). ``/reset`` clears the conversation,
``/exit`` (or end of input) quits. Before the first prompt the kernels are compiled and the decode
graph captured (a reported warm-up step), so TTFT and ms/token, printed after each answer, are
never inflated by first-use costs; a shape first seen mid-conversation is reported as such.
"""
from __future__ import annotations

import re
import sys

from tinyq.generate import ContextOverflowError, make_config, tune_cpu_threads
from tinyq.quant.format import GROUP_SIZES
from tinyq.warmup import warm_up

HELP = "commands: /reset (new conversation), /exit (quit)"
COMMAND = re.compile(r"/[A-Za-z?]+")  # a line of one such word is a command, never a message


def as_text(line: str) -> str:
    """``line`` as valid text: bytes that were not UTF-8 (kept as lone surrogates by Python's
    surrogateescape, or already replaced) become U+FFFD, which every tokenizer can encode."""
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def add_parser(subparsers):
    p = subparsers.add_parser("chat", help="chat with a model in the terminal", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default",
                   help="HF model directory, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--precision", default="w4a16", choices=["w4a16", "w8a8", "fp16", "bf16", "fp32"])
    p.add_argument("--group-size", type=int, default=64, help="W4A16 group size when quantizing at load (32/64/128)")
    p.add_argument("--quant", default="awq", choices=["awq", "rtn"],
                   help="embedded default at w4a16: AWQ (quantized on first use, then cached) or RTN at load")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length of the KV cache")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--tokenizer", default="auto",
                   help="directory holding the tokenizer, when the model's own has none (default: the model's)")
    p.set_defaults(run=run)
    return p


class _Input:
    """Lines from the terminal (with a prompt) or from a pipe; None at end of input."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.tty = self.stream.isatty()

    def read(self, prompt: str):
        if self.tty:
            try:
                return as_text(input(prompt))
            except EOFError:
                return None
            except UnicodeDecodeError:  # a strict-UTF-8 terminal that got other bytes
                print("(that line was not UTF-8 text; type it again)")
                return ""
        print(prompt, end="", flush=True)
        raw = getattr(self.stream, "buffer", None)
        line = raw.readline().decode("utf-8", "replace") if raw is not None else as_text(self.stream.readline())
        if not line:
            return None
        print(line.rstrip("\n"))  # echo, so a piped transcript reads like a session
        return line.rstrip("\n")


def check_device(device) -> None:
    """A ``--device`` torch can place tensors on here, or a ValueError saying why not."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a device torch knows: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device}: tinyq runs on cuda or cpu")


def run(args) -> int:
    from tinyq.chat import ChatSession
    from tinyq.models import load_model

    try:
        sampling = make_config(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
        )
        if args.max_seq_len < 2:
            raise ValueError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
        if args.precision == "w4a16" and args.group_size not in GROUP_SIZES:
            raise ValueError(f"--group-size must be one of {GROUP_SIZES}, got {args.group_size}")
        check_device(args.device)
        path = args.model
        if path == "default" and args.precision == "w4a16" and args.quant == "awq":
            from tinyq.quant.default_awq import ensure_default_awq_checkpoint

            path = str(ensure_default_awq_checkpoint(args.group_size, device=args.device))
        print(f"loading {args.model} ({args.precision}) ...", flush=True)
        model, tokenizer = load_model(path, precision=args.precision, group_size=args.group_size,
                                      device=args.device, max_seq_len=args.max_seq_len, tokenizer=args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
                             "pass --tokenizer DIR (e.g. the base model's directory)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{args.model}'s tokenizer has no chat template (a base model?); pass --tokenizer DIR "
                             "of its instruct version, or use tinyq.generate.generate() for plain completion")
        if model.device.type == "cpu":
            tune_cpu_threads(model)  # this process is ours: pick its thread count
        session = ChatSession(model, tokenizer, max_seq_len=args.max_seq_len,
                              system_prompt=None if args.system is None else as_text(args.system), sampling=sampling)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = model.load_stats
    print(f"loaded: {model.config.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M fp params, "
          f"{args.precision} on {model.device} in {s['seconds']:.1f} s (peak host memory {s['peak_host_mb']:.0f} MB)",
          flush=True)
    if model.device.type == "cuda":
        print("compiling kernels and capturing the prefill and decode graphs (compilation on the first run "
              "only; later starts reuse Triton's disk cache) ...", flush=True)
    try:
        report = warm_up(session.gen, sampling=session.sampling)
    except ValueError as exc:  # e.g. an fp16 model whose activations overflow: its logits are NaN
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ready: {report.summary()}\n{HELP}", flush=True)
    return _loop(session, _Input())


def _loop(session, inp: _Input) -> int:
    while True:
        try:
            line = inp.read("\nyou> ")
        except KeyboardInterrupt:
            print()
            return 0
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            print("(conversation reset)")
            continue
        if COMMAND.fullmatch(text):  # /help, or a mistyped command: not a message for the model
            print(HELP if text in ("/help", "/?") else f"unknown command {text}; {HELP}")
            continue
        if not _answer(session, text, inp):
            return 0


def _answer(session, text: str, inp: _Input) -> bool:
    """One turn; returns False when the user chose to quit."""
    try:
        turn = session.send(text)
    except ContextOverflowError:
        need = len(session.prompt_ids(text)) + 1  # the API's message names API calls; say it in the chat's terms
        print(f"[context full] this message with the conversation so far needs {need} tokens, more than "
              f"--max-seq-len {session.max_seq_len}; the history is kept")
        try:
            choice = inp.read("[r]eset the conversation, [d]rop the oldest turns, or [c]ancel? ")
        except KeyboardInterrupt:  # Ctrl-C at this prompt means cancel, not quit
            print()
            choice = "c"
        if choice is None:
            return False
        choice = choice.strip().lower()[:1]
        if choice in ("r", "d") and not _fits_alone(session, text):
            return True
        if choice == "r":
            session.reset()
        elif choice == "d":
            while session.turns and len(session.prompt_ids(text)) + 1 > session.max_seq_len:
                session.drop_oldest_turns(1)
        else:
            print("(cancelled; the history is kept)")
            return True
        return _answer_once(session, text)
    except ValueError as exc:
        print(f"error: {exc}")
        return True
    return _stream(turn)


def _fits_alone(session, text: str) -> bool:
    """Whether ``text`` fits with no history (the system prompt kept); says so when it does not, so
    no turn is dropped for a message that cannot fit anyway."""
    from tinyq.chat import render_chat

    head = [m for m in session.messages[:1] if m["role"] == "system"]
    need = len(render_chat(session.tokenizer, head + [{"role": "user", "content": text}])) + 1
    if need <= session.max_seq_len:
        return True
    print(f"error: this message alone needs {need} tokens of context, more than --max-seq-len "
          f"{session.max_seq_len}; shorten it (the history is kept)")
    return False


def _answer_once(session, text: str) -> bool:
    try:
        turn = session.send(text)
    except ValueError as exc:  # still too long even with no history
        print(f"error: {exc}")
        return True
    return _stream(turn)


def _stream(turn) -> bool:
    """Print one answer as it streams. A turn that fails mid-answer (NaN logits of an overflowing
    model, a failed forward) was rolled back by the session: say why and keep the conversation."""
    print("assistant> ", end="", flush=True)
    try:
        for delta in turn:
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        print("\n[interrupted: this turn was discarded]")
        return True
    except (ValueError, RuntimeError) as exc:
        print(f"\nerror: {exc}\n[this turn was discarded; the history is kept]")
        return True
    r = turn.result
    note = " | context full: /reset to continue" if r.finish_reason == "context_full" else ""
    print(f"\n[{r.stats.summary()}{note}]", flush=True)
    return True
