"""Prefill through CUDA graphs or through ``torch.compile``: which one a prompt and a chat turn
should take (the choice :mod:`tinyq.graphs` made), measured side by side on one model.

For a 256-token prompt and a 32-token turn after a 1024-token history (Llama-3-8B shapes, random
weights, W4A16 or fp16, optionally fewer layers), the time to the first token's logits through:
- ``graphs``: ``Generator.prefill`` (padded-bucket CUDA graphs, ``tinyq.graphs.PrefillGraphs``);
- ``eager``: one eager ``model(ids, cache, last_only=True)``;
- ``compile-<mode>``: ``torch.compile(model, mode=...)`` called the same way, for each mode asked
  (``default``: inductor kernels launched from Python; ``reduce-overhead``: inductor's CUDA graphs),
  its first call (compilation) timed apart, graph breaks counted.
All means of synced runs after untimed ones; the history is truncated back before each turn. The
compiled model also runs the chunk once more right after, one chunk further into the cache (a
chat's next turn), to show whether a new position recompiles.

    python scripts/prefill_compile_ab.py --out prefill_compile_ab.json
    python scripts/prefill_compile_ab.py --tiny --device cpu --modes default   # smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_e2e import SHAPES, mean_ms, rand_ids, sync  # noqa: E402
from benchmarks.common import environment, random_model, write_json  # noqa: E402
from tinyq.generate import Generator  # noqa: E402
from tinyq.warmup import warm_up  # noqa: E402


def cases(vocab, device, prompt, history, turn):
    """name -> (history ids or None, ids of the timed chunk), each [1, S] on ``device``."""
    return {f"prompt {prompt}": (None, rand_ids(prompt, vocab, device, 1)),
            f"turn {turn} after {history}": (rand_ids(history, vocab, device, 2), rand_ids(turn, vocab, device, 3))}


def time_forward(fn, reset, truncate, length_of, hist, ids, device, reps):
    """Mean ms of ``fn(ids)``, the cache holding ``hist`` (prefilled once, untimed) before each run."""
    reset()
    if hist is not None:
        fn(hist)
    length = length_of()
    return mean_ms(lambda: fn(ids), device, reps, before=lambda: truncate(length), warmup=3)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="w4a16", choices=("w4a16", "fp16"))
    ap.add_argument("--modes", default="reduce-overhead,default")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's 32): fewer "
                    "compile faster, and every path scales alike")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    prompt, history, turn = (256, 1024, 32) if not args.tiny else (24, 40, 8)
    shape = dict(SHAPES["tiny" if args.tiny else "llama3-8b"])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    model = random_model(shape, args.precision, device, 128 if not args.tiny else 32)
    gen = Generator(model, None, max_seq_len=history + prompt + 64)
    warm_up(gen)
    cache = gen.cache
    runs = cases(model.config.vocab_size, device, prompt, history, turn)
    res = {"env": environment(), "args": vars(args), "rows": {}}

    def show(name, what, ms, extra=""):
        res["rows"].setdefault(name, {})[what] = ms
        print(f"[{time.perf_counter() - start:6.1f} s] {name:22s} {what:26s} {ms:9.3f} ms {extra}", flush=True)
        if args.out:  # after every row: a run cut short by its time limit keeps what it measured
            write_json(args.out, res)

    on_cache = (cache.reset, cache.truncate, lambda: cache.length)
    for name, (hist, ids) in runs.items():
        host = {id(t): t[0].tolist() for t in (hist, ids) if t is not None}  # Generator takes host ids
        show(name, "graphs (Generator.prefill)",
             time_forward(lambda t: gen.prefill(host[id(t)]), gen.reset, gen.truncate, lambda: gen.cache.length,
                          hist, ids, device, args.reps))
        show(name, "eager", time_forward(lambda t: model(t, cache, last_only=True), *on_cache, hist, ids, device,
                                         args.reps))
    for mode in [m for m in args.modes.split(",") if m]:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        compiled = torch.compile(model, mode=mode, dynamic=False)
        for name, (hist, ids) in runs.items():
            what = f"compile {mode}"
            print(f"[{time.perf_counter() - start:6.1f} s] {name}: compiling ({what})", flush=True)
            try:
                cache.reset()
                if hist is not None:
                    compiled(hist, cache, last_only=True)
                sync(device)
                t0 = time.perf_counter()
                compiled(ids, cache, last_only=True)  # this shape's compilation
                sync(device)
                first_s = time.perf_counter() - t0
                ms = time_forward(lambda t: compiled(t, cache, last_only=True), *on_cache, hist, ids, device,
                                  args.reps)
                breaks = sum(counters["graph_break"].values())
                # the same chunk once more, now after a longer history: a chat's next turn
                sync(device)
                t0 = time.perf_counter()
                compiled(ids, cache, last_only=True)
                sync(device)
                next_s = time.perf_counter() - t0
                res["rows"][name][f"{what} first call s"] = first_s
                res["rows"][name][f"{what} graph breaks"] = breaks
                res["rows"][name][f"{what} at the next position, first call s"] = next_s
                show(name, what, ms, f"(first call {first_s:.1f} s, {breaks} graph breaks; "
                                     f"at the next position {1e3 * next_s:.1f} ms)")
            except Exception as exc:  # recorded, not fatal: the other modes still run
                res["rows"].setdefault(name, {})[what] = f"failed: {type(exc).__name__}: {exc}"[:500]
                print(f"{name:22s} {what:26s} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if args.out:
        write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
