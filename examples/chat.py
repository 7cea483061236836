"""Chat with a model from Python: load, ask two questions (context streaming), stream the answer.

    python examples/chat.py                      # the embedded SmolLM2-135M-Instruct, W4A16
    python examples/chat.py /path/to/hf/model    # any local Llama / Qwen2 HF directory
"""
import argparse
import sys

from tinyq.chat import ChatSession
from tinyq.models import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default", help="HF model directory, .gguf file or 'default'")
    args = ap.parse_args()
    try:
        model, tokenizer = load_model(args.model, precision="w4a16", verbose=True)
        chat = ChatSession(model, tokenizer, max_seq_len=2048, temperature=0.0, max_new_tokens=128)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for question in ["What is the capital of France?", "And what is it famous for?"]:
        print(f"\nyou> {question}\nassistant> ", end="", flush=True)
        turn = chat.send(question)
        for delta in turn:  # text deltas as they are generated
            print(delta, end="", flush=True)
        print(f"\n[{turn.result.stats.summary()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
