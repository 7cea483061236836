"""First-use cost of a fresh process: load + warm-up (Triton compilation, CUDA-graph capture) of a
random-weight model, then the first answer's TTFT next to the second's. Run it twice: the second
process reuses Triton's on-disk kernel cache, which is what every start after the first pays.

    python benchmarks/bench_warm_start.py --model smollm2 --out $OUT/warm_start_1.json
    python benchmarks/bench_warm_start.py --model smollm2 --out $OUT/warm_start_2.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_e2e import GROUP_SIZE, SHAPES  # noqa: E402
from benchmarks.common import environment, random_model, require_cuda, write_json  # noqa: E402
from tinyq.generate import Generator, make_config  # noqa: E402
from tinyq.warmup import warm_up  # noqa: E402


class _NoText:
    """Random weights make no text: a tokenizer stand-in that decodes every id list to nothing."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--precision", default="w4a16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    require_cuda("bench_warm_start")
    t0 = time.perf_counter()
    model = random_model(SHAPES[args.model], args.precision, torch.device("cuda"), GROUP_SIZE.get(args.model, 128))
    gen = Generator(model, _NoText(), max_seq_len=2048)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    report = warm_up(gen)
    vocab = model.config.vocab_size
    answers = []
    for turn in range(2):  # a 37-token prompt, then a 19-token follow-up, as in a first chat
        prompt = gen.cached_ids + [(7 * i + turn) % vocab for i in range(37 if turn == 0 else 19)]
        stream = gen.stream(prompt, config=make_config(temperature=0.0, max_new_tokens=16))
        for _ in stream:
            pass
        s = stream.result.stats
        answers.append(dict(ttft_ms=1e3 * s.ttft_s, ms_per_token=s.ms_per_token, compiled=s.compiled_kernels,
                            capture_s=s.capture_s))
    out = dict(env=environment(), model=args.model, precision=args.precision, load_s=load_s, warmup=asdict(report),
               answers=answers, first_over_second_ttft=answers[0]["ttft_ms"] / answers[1]["ttft_ms"])
    print(f"load {load_s:.1f} s | {report.summary()} | TTFT first {answers[0]['ttft_ms']:.2f} ms, "
          f"second {answers[1]['ttft_ms']:.2f} ms | {answers[0]['ms_per_token']:.3f} ms/token")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
