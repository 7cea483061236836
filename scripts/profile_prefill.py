"""Profile helper: how a long prompt's prefill is cut into graph pieces, and what each way costs.

    python3 scripts/profile_prefill.py --model qwen2-7b --lengths 3122,4096 \
        --plans "2048:256,2048:inf,4096:256,4096:inf,4096:256:auto" [--kernels]

Each plan ``CHUNK:WASTE[:auto]`` is a :class:`tinyq.generate.Generator` with ``prefill_chunk=CHUNK``
(buckets up to it, powers of two) whose :class:`tinyq.graphs.PrefillGraphs` has
``split_waste=WASTE`` (``inf``: always one padded bucket per chunk) and, with ``auto``, the shipped
rule that leaves GPU-bound chunks to the eager forward (without it every chunk takes the graphs).
Per plan and length it prints the pieces and the median wall time of ``Generator.prefill`` (graphs
captured beforehand), next to one eager ``model()`` forward of the whole prompt, all in one process
on one random-weight model. ``--kernels`` adds each plan's kernel-time table (torch profiler) for
the first length.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_e2e import GROUP_SIZE, SHAPES, rand_list  # noqa: E402
from benchmarks.common import random_model  # noqa: E402
from scripts.profile_decode import kernel_table  # noqa: E402
from tinyq.generate import Generator  # noqa: E402
from tinyq.graphs import EAGER_MIN_LAYER_FLOP, PrefillGraphs  # noqa: E402


def parse_plan(text):
    chunk, waste, *auto = text.split(":")
    return int(chunk), (10 ** 9 if waste == "inf" else int(waste)), auto == ["auto"]


def time_ms(fn, reps):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def chunk_plan(gen, n):
    """The (real, bucket) pieces ``gen.prefill`` runs for ``n`` tokens from an empty cache (bucket
    None: the eager forward)."""
    out, done = [], 0
    while done < n:
        take = min(gen.prefill_chunk, n - done)
        gen.cache.length = done  # host-side fill level only: pieces() reads nothing else
        graphs = gen.prefill_graphs
        out += (not graphs.gpu_bound(take) and graphs.pieces(take)) or [(take, None)]
        done += take
    gen.cache.length = 0
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2-7b")
    ap.add_argument("--precision", default="w4a16")
    ap.add_argument("--lengths", default="3122,4096")
    ap.add_argument("--plans", default="2048:256,2048:inf,4096:256,4096:inf,4096:256:auto")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda")
    model = random_model(SHAPES[args.model], args.precision, device, GROUP_SIZE.get(args.model, 128))
    lengths = [int(x) for x in args.lengths.split(",")]
    vocab = model.config.vocab_size
    res = {"model": args.model, "precision": args.precision, "rows": []}
    rows = res["rows"]

    gen = Generator(model, None, max_seq_len=max(lengths) + 64, cuda_graph=False)
    for n in lengths:  # the whole prompt as one eager forward
        ids = torch.tensor([rand_list(n, vocab)], device=device)

        def eager():
            gen.cache.truncate(0)
            with torch.inference_mode():
                model(None, gen.cache, last_only=True, inputs_embeds=model.model.embed_tokens(ids))

        eager()
        rows.append(dict(plan="eager, one forward", n=n, pieces=[[n, None]], ms=time_ms(eager, args.reps)))
        print(f"{'eager, one forward':24s} n={n:5d} {rows[-1]['ms']:8.2f} ms", flush=True)
    del gen

    for text in args.plans.split(","):
        chunk, waste, auto = parse_plan(text)
        buckets = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b <= chunk]
        gen = Generator(model, None, max_seq_len=max(lengths) + 64, prefill_chunk=chunk, prefill_buckets=buckets)
        gen.prefill_graphs = PrefillGraphs(model, gen.cache, buckets, split_waste=waste,
                                           eager_min_layer_flop=EAGER_MIN_LAYER_FLOP if auto else float("inf"))
        for n in lengths:
            ids = rand_list(n, vocab)

            def run():
                gen.reset()
                gen.prefill(ids)

            run()  # captures this plan's buckets
            pieces = chunk_plan(gen, n)
            ms = time_ms(run, args.reps)
            rows.append(dict(plan=f"chunk {chunk}, waste {text.split(':')[1]}{', auto' if auto else ''}", n=n,
                             pieces=pieces, ms=ms))
            print(f"{rows[-1]['plan']:24s} n={n:5d} {ms:8.2f} ms  pieces {pieces}", flush=True)
            if args.kernels and n == lengths[0]:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    run()
                    torch.cuda.synchronize()
                table = kernel_table(prof, 1)
                rows[-1]["kernels"] = [dict(zip(("name", "n", "us"), r[:3])) for r in table]
                for r in table[:12]:
                    print(f"    {r[0]:70s} {r[1]:6.0f} {r[2] / 1e3:8.2f} ms")
        del gen
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
