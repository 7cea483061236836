"""Terminal chat with a vision-language model: images, several images, video, streamed answers.

    python examples/chat_vlm.py --model /path/to/NVILA-8B --image photo.jpg
    python examples/chat_vlm.py --model /path/to/llava-1.5-7b-hf --image a.jpg,b.jpg --precision fp16
    python examples/chat_vlm.py --model DIR --video clip.mp4 --frames 8       # mp4 needs PyAV; GIF / frame dirs do not
    python examples/chat_vlm.py --random-tiny --image photo.jpg               # RANDOM weights: a CPU demo of the pipeline
    python examples/chat_vlm.py --model DIR --image a.jpg --vision-precision w8a8 --vision-calib c1.jpg,c2.jpg

VILA-1.5 checkpoints are prompted in the legacy format VILA picks by their name (vicuna_v1, llama_3,
hermes-2); ``--conversation template`` uses the tokenizer's chat template instead.

In the chat: ``/image PATH[,PATH]`` adds images to the next message, ``/video PATH`` a video,
``/reset`` forgets everything, ``/exit`` quits. After each answer: time to first token, vision
encoder time and decode ms/token. ``--prompt TEXT`` answers one message and exits.
"""
import argparse
import re
import sys

import torch

from tinyq.models.vlm import load_vlm
from tinyq.vlm.session import VLMChatSession

RANDOM_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  --random-tiny: this model has RANDOM WEIGHTS. Its answers are NOISE.     !!
!!  It only shows the pipeline running (tiling, tower, projector, LLM, chat). !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


COMMANDS = "/image PATH[,PATH]  /video PATH  /reset  /exit"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="llava-hf or VILA/NVILA directory")
    src.add_argument("--random-tiny", action="store_true", help="a small NVILA-shaped model with RANDOM weights")
    p.add_argument("--image", help="image path(s), comma-separated, for the first message")
    p.add_argument("--video", help="video file (mp4 needs PyAV), animated GIF or directory of frames")
    p.add_argument("--frames", type=int, default=None,
                   help="frames sampled uniformly from --video (default: the checkpoint's num_video_frames, else 8)")
    p.add_argument("--precision", choices=["w4a16", "fp16", "bf16", "fp32"], default=None,
                   help="LLM precision (default: w4a16 on a GPU, fp32 on a CPU)")
    p.add_argument("--vision-precision", choices=["fp", "w8a8"], default="fp",
                   help="w8a8: SmoothQuant int8 vision tower (calibrated on --vision-calib images; without them, "
                        "plain per-token W8A8)")
    p.add_argument("--vision-calib", help="calibration image path(s), comma-separated, for --vision-precision w8a8")
    p.add_argument("--conversation", default="auto",
                   help="VILA-1.5 prompt format: auto (chosen by the checkpoint's name, as VILA does), template "
                        "(the tokenizer's chat template), vicuna_v1, llama_3 or hermes-2")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--prompt", help="answer this one message and exit")
    args = p.parse_args(argv)
    if args.max_seq_len < 2:  # 0 would read as "the model's default" further down
        p.error(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    return args


def add_media(chat, images=None, video=None, frames=None):
    """Encode media now; prints what was added. Returns False (and says why) on bad input."""
    try:
        if images:
            counts = chat.add_images([p.strip() for p in images.split(",") if p.strip()])
            print(f"[{len(counts)} image(s), {sum(counts)} tokens, vision {vision_ms(chat)}]")
        if video:
            counts = chat.add_video(video, frames)
            frames = frames or getattr(chat.vlm, "num_video_frames", 8)
            print(f"[video: {frames} frames, {sum(counts)} tokens, vision {vision_ms(chat)}]")
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}")
        return False
    except KeyboardInterrupt:  # Ctrl-C while encoding: nothing was added
        print("\n[interrupted: the media were not added]")
        return False
    return True


def vision_ms(chat) -> str:
    out = f"{1e3 * chat.last_vision_s:.0f} ms"
    if chat.last_vision_compile_s:
        out += f" (+{chat.last_vision_compile_s:.1f} s compiling kernels for a new shape, not counted)"
    if chat.last_vision_capture_s:
        out += f" (+{chat.last_vision_capture_s:.2f} s capturing CUDA graphs for a new batch size, not counted)"
    return out


def answer(chat, text) -> bool:
    """One turn, streamed; False when it failed (an error, or interrupted)."""
    vision_s = chat.pending_vision_s  # every image added since the last message
    try:
        turn = chat.send(text)
        print("assistant> ", end="", flush=True)
        for delta in turn:
            print(delta, end="", flush=True)
    except ValueError as exc:  # placeholder/image mismatch, context overflow
        print(f"error: {exc}")
        return False
    except KeyboardInterrupt:  # the session rolled the turn back; its images stay pending
        print("\n[interrupted: this turn was discarded]")
        return False
    s = turn.result.stats
    print(f"\n[TTFT {1e3 * s.ttft_s:.0f} ms ({s.prefilled_tokens} tokens prefilled) | vision encoder "
          f"{1e3 * vision_s:.0f} ms | {s.ms_per_token:.1f} ms/token ({s.new_tokens} tokens)]")
    if s.compiled_kernels:
        print(f"[first use of a new shape: {s.compiled_kernels} kernels compiled in {s.compile_s:.1f} s, not counted]")
    return True


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("w4a16" if device == "cuda" else "fp32")
    if args.random_tiny:
        from tinyq.vlm.tiny import random_tiny_nvila

        print(RANDOM_WARNING)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if device == "cuda" else None
        if dtype is None:  # fp32, or a precision only real checkpoints get (w4a16), or a CPU
            dtype = torch.float32
            if precision != "fp32":
                given = f"--precision {precision}" + (" (the default)" if args.precision is None else "")
                print(f"[the random tiny model runs in fp32 here; {given} applies to real checkpoints]")
        model, tokenizer = random_tiny_nvila(dtype=dtype, device=device)
    else:
        conversation = None if args.conversation == "template" else args.conversation
        try:
            model, tokenizer = load_vlm(args.model, precision, device=device, max_seq_len=args.max_seq_len,
                                        conversation=conversation)
        except (ValueError, OSError) as exc:  # not a model directory, a missing or unreadable file
            print(f"error: {exc}")
            return 1
        prompt = model.conversation.name + " conversation format" if model.conversation else "chat template"
        print(f"loaded {args.model} ({precision}, {prompt}) in {model.load_stats['seconds']:.1f} s")
    if args.vision_precision == "w8a8":
        from tinyq.models.vision_w8a8 import quantize_vlm_tower_
        from tinyq.vlm.media import load_image

        try:
            calib = [load_image(p.strip()) for p in (args.vision_calib or "").split(",") if p.strip()]
        except ValueError as exc:
            print(f"error: {exc}")
            return 1
        quantize_vlm_tower_(model, calib)
        print(f"[vision tower: W8A8, SmoothQuant {'calibrated on %d image(s)' % len(calib) if calib else 'off'}]")
    try:
        chat = VLMChatSession(model, tokenizer, max_seq_len=min(args.max_seq_len, model.llm.max_seq_len),
                              temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    except ValueError as exc:  # e.g. a conversation format whose answer-ending token the tokenizer lacks
        print(f"error: {exc}")
        return 1
    if device == "cuda":  # compile kernels and capture the decode graph now, not in the first answer
        print(f"[{chat.warm_up().summary()}]")
    if not add_media(chat, args.image, args.video, args.frames):
        return 1
    if args.prompt:
        return 0 if answer(chat, args.prompt) else 1
    print(COMMANDS)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            chat.reset()
            print("[conversation and media forgotten]")
        elif line.startswith("/image ") and line[len("/image "):].strip():
            add_media(chat, images=line[len("/image "):])
        elif line.startswith("/video ") and line[len("/video "):].strip():
            add_media(chat, video=line[len("/video "):].strip(), frames=args.frames)
        elif line.startswith("/") and line.split()[0] in ("/image", "/video", "/reset", "/exit"):
            print(f"usage: {COMMANDS}")  # a command without its path, or with extra words
        elif re.fullmatch(r"/[a-z]+", line.split()[0]):  # a mistyped command, not a message like "/etc/hosts?"
            print(f"unknown command {line.split()[0]}; {COMMANDS}")
        else:
            answer(chat, line)
            if args.random_tiny:
                print("(random weights: the answer above is noise)")


if __name__ == "__main__":
    sys.exit(main())
