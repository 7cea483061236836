"""VLM benchmark in NVILA-8B shapes with random weights: tinyq next to a transformers reference
built from the same parts, in the same run.

* tinyq: SigLIP so400m-448 tower in fp16 (Triton LayerNorm, flash attention), dynamic-S2 merge,
  2x2 projector, Qwen2-7B LLM in W4A16 (g128), static KV cache, chunked prefill, CUDA-graph decode.
* reference: transformers ``SiglipVisionModel`` fp16 with the fastest SDPA backend (each one
  tried), the same merge code, the projector as plain torch modules fp16 (same weights as
  tinyq's), ``Qwen2ForCausalLM`` fp16 fed ``inputs_embeds``, its own KV cache.

Measured:

* tower ms per 448 tile: one tile, and the 17 tiles of a 1344x896 image (per tile), all 27 layers
  on both sides (same work), ``triton.testing.do_bench`` medians, both towers replayed from CUDA
  graphs (transformers' captured with its best SDPA backend) and both eager; plus NVILA's feature
  path (``hidden_states[-2]``: tinyq runs 26 layers, transformers all 27);
* TTFT, one 1344x896 image (17 tiles, 3072 image tokens) + a 32-token question, from the tiles'
  pixels on the GPU to the first token (tower, merge, projector, prefill, argmax); the shared
  CPU preprocessing (tiling + processor) is reported apart; mean of ``--reps`` synced runs after
  warm-up (bench_e2e's TTFT convention);
* a follow-up text turn: a 32-token question prefilled over that image conversation vs over a
  text-only history of the same length;
* decode ms/token after the image prompt.

    python benchmarks/bench_vlm.py --out benchmarks/results/vlm_h200.json    # ~3 min, < 30 GB
    python benchmarks/bench_vlm.py --tiny --device cpu                       # smoke test of the script
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_e2e import SHAPES, hf_model, mean_ms, random_model, sync  # noqa: E402
from benchmarks.common import bench_ms, capture_graph, environment, require_cuda, write_json  # noqa: E402
from tinyq.generate import Generator  # noqa: E402
from tinyq.graphs import BatchGraphs  # noqa: E402
from tinyq.models.loader import TensorSource  # noqa: E402
from tinyq.models.nvila import NvilaModel, build_projector, s2_blocks, s2_tiles, s2_unblock  # noqa: E402
from tinyq.models.vision import VisionConfig, load_vision_tower  # noqa: E402
from tinyq.models.vision_w8a8 import cosine_similarity, quantize_tower_w8a8_  # noqa: E402
from tinyq.vlm import media  # noqa: E402

TOWERS = {  # SigLIP so400m-patch14-448 (NVILA-8B's tower), and a tiny one for the smoke test
    "so400m-448": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                       num_hidden_layers=27, num_attention_heads=16, image_size=448, patch_size=14,
                       layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    "tiny": dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, image_size=56, patch_size=14, layer_norm_eps=1e-6,
                 hidden_act="gelu_pytorch_tanh"),
}
TARGETS = {"tower_speedup": 1.0, "ttft_speedup": 1.5, "follow_up_ratio": 1.2}
QUESTION = 32


def hf_tower(cfg: dict, device, dtype):
    """transformers SiglipVisionModel (no pooling head: NVILA reads hidden states) with random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf_cfg = SiglipVisionConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, vision_use_head=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = SiglipVisionModel(hf_cfg).to(device, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.02 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.02 * torch.randn_like(p))
    return model


def sdpa_backends(device):
    """``(name, context factory)`` of every SDPA backend to try (CPU: the default only)."""
    import contextlib

    if device.type != "cuda":
        return [("default", contextlib.nullcontext)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return [(n, lambda b=getattr(SDPBackend, n): sdpa_kernel(b)) for n in names if hasattr(SDPBackend, n)]


def time_ms(fn, device, reps):
    if device.type == "cuda":
        return bench_ms(fn)
    return mean_ms(fn, device, reps)


@torch.inference_mode()
def bench_tower(ours, ref, px_one, px_image, device, reps):
    """Tower timings; returns a dict (ms)."""
    # eager, and as the VLMs run it (VisionTower.encode): CUDA graphs of chunks of 8, 4, 2, 1 tiles
    graphed = BatchGraphs(ours.last_hidden_state, capture=device.type == "cuda")
    r = {"tinyq_eager_ms_1_tile": time_ms(lambda: ours.last_hidden_state(px_one), device, reps),
         "tinyq_eager_ms_per_tile_17": time_ms(lambda: ours.last_hidden_state(px_image), device, reps) / len(px_image),
         "tinyq_ms_1_tile": time_ms(lambda: graphed(px_one), device, reps),
         "tinyq_ms_per_tile_17": time_ms(lambda: graphed(px_image), device, reps) / len(px_image),
         "tinyq_feature_path_ms_1_tile": time_ms(lambda: ours.encode(px_one, -2, "full"), device, reps)}
    best = None
    for name, ctx in sdpa_backends(device):
        try:
            with ctx():
                one = time_ms(lambda: ref(px_one).last_hidden_state, device, reps)
                many = time_ms(lambda: ref(px_image).last_hidden_state, device, reps) / len(px_image)
                feat = time_ms(lambda: ref(px_one, output_hidden_states=True).hidden_states[-2], device, reps)
        except RuntimeError as exc:  # backend cannot run this shape / dtype
            print(f"  SDPA {name}: unavailable ({str(exc).splitlines()[0][:80]})")
            continue
        r[f"hf_{name}_ms_1_tile"] = one
        print(f"  SDPA {name}: {one:.3f} ms per tile (batch 1), {many:.3f} (batch {len(px_image)})")
        if best is None or one < best[1]:
            best = (name, one, many, feat)
    r["hf_best_backend"], r["hf_eager_ms_1_tile"], r["hf_eager_ms_per_tile_17"], r["hf_feature_path_ms_1_tile"] = best
    # like for like with tinyq's graphed tower: transformers' tower captured in CUDA graphs too (what
    # torch.compile's reduce-overhead mode does), with its best backend; eager where capture fails
    r["hf_ms_1_tile"], r["hf_ms_per_tile_17"], r["hf_timing"] = best[1], best[2], "eager"
    if device.type == "cuda":
        try:
            with dict(sdpa_backends(device))[best[0]]():
                one = capture_graph(lambda: ref(px_one).last_hidden_state, warmups=2).replay
                many = capture_graph(lambda: ref(px_image).last_hidden_state, warmups=2).replay
            r["hf_ms_1_tile"] = time_ms(one, device, reps)
            r["hf_ms_per_tile_17"] = time_ms(many, device, reps) / len(px_image)
            r["hf_timing"] = "CUDA graphs"
        except RuntimeError as exc:
            r["hf_timing"] = "eager (capture failed)"
            print(f"  transformers tower capture failed ({str(exc).splitlines()[0][:80]}): eager timings compared")
    print(f"  transformers tower ({r['hf_timing']}, SDPA {best[0]}): {r['hf_ms_1_tile']:.3f} ms (batch 1), "
          f"{r['hf_ms_per_tile_17']:.3f} per tile (batch {len(px_image)})")
    with torch.no_grad():  # same weights: the outputs must agree
        a = ours.last_hidden_state(px_one).float()
        b = ref(px_one).last_hidden_state.float()
    r["max_rel_diff"] = float((a - b).abs().max() / b.abs().max())
    return r, best[0]


@torch.inference_mode()
def bench_w8a8_tower(tower, px, device, reps):
    """The SmoothQuant W8A8 tower (calibrated on 4 of the tiles) against the fp16 one, same run:
    ms per tile at batch 1 and at 17 tiles (CUDA graphs, as the fp16 tower), and the output's cosine
    similarity to the fp16 tower's."""
    w8 = copy.deepcopy(tower)
    quantize_tower_w8a8_(w8, lambda: w8.last_hidden_state(px[:4]))
    fp = tower.last_hidden_state(px).float()
    graphed = BatchGraphs(w8.last_hidden_state, capture=device.type == "cuda")  # as the fp16 tower is timed
    return {"w8a8_ms_1_tile": time_ms(lambda: graphed(px[:1]), device, reps),
            "w8a8_ms_per_tile_17": time_ms(lambda: graphed(px), device, reps) / len(px),
            "cosine_vs_fp16": cosine_similarity(w8.last_hidden_state(px), fp)}


def reference_projector(ours: nn.Sequential, dtype):
    """The same projector as plain torch modules (``nn.LayerNorm`` / ``nn.Linear`` / ``nn.GELU``)."""
    mods = []
    for m in ours:
        if type(m).__name__ == "LayerNorm":
            mods.append(nn.LayerNorm(m.weight.shape[0], eps=m.eps))
        elif isinstance(m, nn.Linear):
            mods.append(nn.Linear(m.in_features, m.out_features))
        elif type(m).__name__ == "GELU":
            mods.append(nn.GELU())
        else:
            mods.append(m)  # SpaceToChannel: a reshape
    ref = nn.Sequential(*mods)
    ref.load_state_dict(ours.state_dict())
    return ref.to(ours[1].weight.device, dtype).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    require_cuda("bench_vlm", args.device, "; --tiny --device cpu runs its smoke test")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tcfg, llm_name = (TOWERS["tiny"], "tiny") if args.tiny else (TOWERS["so400m-448"], "qwen2-7b")
    tile = tcfg["image_size"]
    scales = [tile, 2 * tile, 3 * tile]
    results = {"env": environment(), "tower": tcfg, "llm": llm_name, "group_size": args.group_size}

    # ---- towers (same weights) and the 1344x896 image's tiles
    ref_tower = hf_tower(tcfg, device, dtype)
    vcfg = VisionConfig.from_hf(tcfg)
    tower = load_vision_tower(vcfg, TensorSource(tensors=ref_tower.state_dict()), "", dtype, device)
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(2 * tile, 3 * tile, 3, generator=g) * 255).byte().numpy())  # 1344 x 896
    processor = media.image_processor("siglip", tile)
    t0 = time.perf_counter()
    tiles, (rows, cols) = s2_tiles(image, scales, 12)
    px = media.pixel_values(processor, tiles).to(device, dtype)
    results["preprocess_ms_cpu"] = 1e3 * (time.perf_counter() - t0)
    print(f"image {image.size}: {len(tiles)} tiles, last grid {rows} x {cols}; "
          f"preprocessing {results['preprocess_ms_cpu']:.0f} ms (CPU, shared by both)", flush=True)
    results["tower_ms"], best_backend = bench_tower(tower, ref_tower, px[:1], px, device, args.reps)
    print(f"tower: {results['tower_ms']}", flush=True)
    results["tower_w8a8"] = bench_w8a8_tower(tower, px, device, args.reps)
    print(f"W8A8 tower: {results['tower_w8a8']}", flush=True)

    # ---- tinyq NVILA: W4A16 Qwen2 + fp16 tower/projector
    llm = random_model(SHAPES[llm_name], "w4a16", device, args.group_size)
    hidden = llm.config.hidden_size
    projector, _ = build_projector("mlp_downsample_2x2_fix", 3 * vcfg.hidden_size, hidden)
    with torch.no_grad():
        for name, p in projector.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("1.weight") else 0.02 * torch.randn_like(p))
    projector.to(device, dtype).requires_grad_(False)
    model = NvilaModel(tower, projector, llm, image_token_id=0, newline_ids=[1], s2_scales=scales, processor=processor)
    vocab = llm.config.vocab_size
    ids_g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(2, vocab, (n,), generator=ids_g).tolist()  # noqa: E731
    rows_t = model.encode_s2_pixels(px, rows, cols)
    n_img = rows_t.shape[0]
    prompt = rand(12) + model.placeholder_ids(rows_t, None) + rand(QUESTION) + rand(5)
    results["image_tokens"], results["prompt_tokens"] = n_img, len(prompt)
    ids_t = torch.tensor([prompt], device=device)
    state = {}
    gen = Generator(llm, None, max_seq_len=len(prompt) + 2 * QUESTION + args.decode_steps + 16,
                    embed_fn=lambda x, start: state["embeds"][:, start:start + x.shape[1]] if start < len(prompt)
                    else llm.model.embed_tokens(x))  # the image prompt, then plain text

    def tinyq_ttft():
        state["embeds"] = model.embed(ids_t, [model.encode_s2_pixels(px, rows, cols)])
        return int(gen.prefill(prompt).argmax())

    r = results.setdefault("tinyq", {})
    r["ttft_ms"] = mean_ms(tinyq_ttft, device, args.reps, before=gen.reset)
    print(f"tinyq TTFT (1 image + {QUESTION}-token question, {len(prompt)} tokens): {r['ttft_ms']:.1f} ms", flush=True)
    with torch.inference_mode():  # where the TTFT goes, stage by stage (each synchronized)
        feats = model._features(px)
        blocks = s2_blocks(feats, rows, cols, scales)
        r["ttft_parts_ms"] = {
            "tower (CUDA graphs, 17 tiles)": mean_ms(lambda: model._features(px), device, args.reps),
            "S2 merge": mean_ms(lambda: s2_blocks(feats, rows, cols, scales), device, args.reps),
            "projector + unblock": mean_ms(lambda: s2_unblock(projector(blocks), rows, cols), device, args.reps),
            "embed + splice": mean_ms(lambda: model.embed(ids_t, [rows_t]), device, args.reps),
            "prefill + first token": mean_ms(lambda: int(gen.prefill(prompt).argmax()), device, args.reps,
                                             before=gen.reset),
        }
    print("  TTFT parts: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["ttft_parts_ms"].items()), flush=True)
    gen.reset()
    tok = tinyq_ttft()
    hist = gen.cache.length
    question = rand(QUESTION)
    r["follow_up_ttft_ms"] = mean_ms(lambda: int(gen.prefill(question).argmax()), device, args.reps,
                                     before=lambda: gen.truncate(hist))
    gen.truncate(hist)
    for _ in range(3):  # capture the decode graph, warm up
        tok = int(gen.decode(tok).argmax())
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.decode_steps):
        tok = int(gen.decode(tok).argmax())
    sync(device)
    r["decode_ms"] = 1e3 * (time.perf_counter() - t0) / args.decode_steps
    text_gen = Generator(llm, None, max_seq_len=hist + 2 * QUESTION + 16)
    text_gen.prefill(rand(hist))
    r["text_only_ttft_ms"] = mean_ms(lambda: int(text_gen.prefill(question).argmax()), device, args.reps,
                                     before=lambda: text_gen.truncate(hist))
    print(f"tinyq follow-up TTFT {r['follow_up_ttft_ms']:.2f} ms vs text-only {r['text_only_ttft_ms']:.2f} ms "
          f"at {hist} tokens of history; decode {r['decode_ms']:.2f} ms/token", flush=True)
    del gen, text_gen, model, llm, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- reference: transformers tower (best SDPA backend) + torch projector + Qwen2ForCausalLM fp16
    ref_proj = reference_projector(projector, dtype)
    ref_llm = hf_model(SHAPES[llm_name], device).to(dtype)
    mask = ids_t[0] == 0
    ctx = dict(sdpa_backends(device))[best_backend]
    out = {}

    @torch.inference_mode()
    def hf_ttft():
        with ctx():
            feats = ref_tower(px, output_hidden_states=True).hidden_states[-2]
        img = s2_unblock(ref_proj(s2_blocks(feats, rows, cols, scales)), rows, cols)
        emb = ref_llm.get_input_embeddings()(ids_t)
        emb[0, mask] = img.to(emb.dtype)
        o = ref_llm(inputs_embeds=emb, use_cache=True, logits_to_keep=1)
        out["past"], out["tok"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
        return int(out["tok"])

    h = results.setdefault("hf_fp16", {})
    h["ttft_ms"] = mean_ms(hf_ttft, device, args.reps)
    with torch.inference_mode():
        past, tok = out["past"], out["tok"]
        for _ in range(2):
            o = ref_llm(tok, past_key_values=past, use_cache=True)
            past, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            o = ref_llm(tok, past_key_values=past, use_cache=True)
            past, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
            int(tok)
        sync(device)
    h["decode_ms"] = 1e3 * (time.perf_counter() - t0) / args.decode_steps
    print(f"transformers fp16 TTFT {h['ttft_ms']:.1f} ms, decode {h['decode_ms']:.2f} ms/token", flush=True)
    if device.type == "cuda":
        results["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    results["summary"] = summarize(results)
    write_json(args.out, results)


def summarize(res):
    rows = []
    t, r, h = res["tower_ms"], res["tinyq"], res["hf_fp16"]

    def row(what, value, target, met):
        rows.append({"what": what, "value": round(value, 4), "target": target, "met": met})

    sp = t["hf_ms_1_tile"] / t["tinyq_ms_1_tile"]
    row(f"tower fp16 ms per 448 tile, batch 1, CUDA graphs (transformers {t['hf_ms_1_tile']:.3f} ms, "
        f"{t['hf_timing']}, SDPA {t['hf_best_backend']})", t["tinyq_ms_1_tile"],
        f">= {TARGETS['tower_speedup']}x transformers", sp >= TARGETS["tower_speedup"])
    row(f"tower speedup vs transformers, batch 1 (tinyq CUDA graphs vs transformers {t['hf_timing']})", sp,
        f">= {TARGETS['tower_speedup']}", sp >= TARGETS["tower_speedup"])
    sp_eager = t["hf_eager_ms_1_tile"] / t["tinyq_eager_ms_1_tile"]
    row(f"tower speedup vs transformers, batch 1, both eager ({t['tinyq_eager_ms_1_tile']:.3f} vs "
        f"{t['hf_eager_ms_1_tile']:.3f} ms)", sp_eager, "info", None)
    sp17 = t["hf_ms_per_tile_17"] / t["tinyq_ms_per_tile_17"]
    row(f"tower speedup vs transformers, 17 tiles, per tile ({t['tinyq_ms_per_tile_17']:.3f} vs "
        f"{t['hf_ms_per_tile_17']:.3f} ms, transformers {t['hf_timing']}; both eager: "
        f"{t['tinyq_eager_ms_per_tile_17']:.3f} vs {t['hf_eager_ms_per_tile_17']:.3f})", sp17,
        f">= {TARGETS['tower_speedup']}", sp17 >= TARGETS["tower_speedup"])
    row(f"tower NVILA feature path ms, 1 tile (transformers {t['hf_feature_path_ms_1_tile']:.3f} ms)",
        t["tinyq_feature_path_ms_1_tile"], "info", None)
    w8 = res.get("tower_w8a8")
    if w8:
        sp = t["tinyq_ms_per_tile_17"] / w8["w8a8_ms_per_tile_17"]
        row(f"W8A8 tower speedup vs the fp16 tower, 17 tiles ({w8['w8a8_ms_per_tile_17']:.3f} ms per tile)", sp,
            ">= 1.3", sp >= 1.3)
        sp = t["tinyq_ms_1_tile"] / w8["w8a8_ms_1_tile"]
        row(f"W8A8 tower speedup vs the fp16 tower, 1 tile ({w8['w8a8_ms_1_tile']:.3f} ms)", sp, "info", None)
        row("W8A8 tower output cosine similarity to fp16 (random weights, SmoothQuant)", w8["cosine_vs_fp16"],
            ">= 0.99", w8["cosine_vs_fp16"] >= 0.99)
    sp = h["ttft_ms"] / r["ttft_ms"]
    row(f"TTFT ms, 1 image + {QUESTION}-token question, W4A16 (transformers fp16 {h['ttft_ms']:.1f} ms)",
        r["ttft_ms"], f">= {TARGETS['ttft_speedup']}x transformers", sp >= TARGETS["ttft_speedup"])
    row("TTFT speedup vs transformers fp16", sp, f">= {TARGETS['ttft_speedup']}", sp >= TARGETS["ttft_speedup"])
    ratio = r["follow_up_ttft_ms"] / r["text_only_ttft_ms"]
    row(f"follow-up text turn TTFT / text-only turn TTFT ({r['follow_up_ttft_ms']:.2f} / "
        f"{r['text_only_ttft_ms']:.2f} ms)", ratio, f"<= {TARGETS['follow_up_ratio']}", ratio <= TARGETS["follow_up_ratio"])
    row(f"decode ms/token W4A16 (transformers fp16 {h['decode_ms']:.2f})", r["decode_ms"], "info", None)
    print(f"\n{'measurement':100s} {'value':>10s}  {'target':>26s}  met")
    for x in rows:
        met = "-" if x["met"] is None else ("yes" if x["met"] else "NO")
        print(f"{x['what']:100s} {x['value']:10.3f}  {x['target']:>26s}  {met}")
    return rows


if __name__ == "__main__":
    main()
