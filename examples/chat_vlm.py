"""Terminal chat with a vision-language model: images, several images, video, streamed answers.

    python examples/chat_vlm.py --model /path/to/NVILA-8B --image photo.jpg
    python examples/chat_vlm.py --model /path/to/llava-1.5-7b-hf --image a.jpg,b.jpg --precision fp16
    python examples/chat_vlm.py --model DIR --video clip.mp4 --frames 8       # mp4 needs PyAV; GIF / frame dirs do not
    python examples/chat_vlm.py --random-tiny --image photo.jpg               # RANDOM weights: a CPU demo of the pipeline
    python examples/chat_vlm.py --model DIR --image a.jpg --vision-precision w8a8 --vision-calib c1.jpg,c2.jpg

VILA-1.5 checkpoints are prompted in the legacy format VILA picks by their name (vicuna_v1, llama_3,
hermes-2); ``--conversation template`` uses the tokenizer's chat template instead.

In the chat: ``/image PATH[,PATH]`` adds images to the next message, ``/video PATH`` a video,
``/drop`` discards the media not yet sent, ``/forget`` the oldest exchange (its media with it, for a
message that no longer fits), ``/reset`` forgets everything, ``/exit`` quits. Paths may
start with ``~`` and come quoted (as dragged into a terminal). After each answer: time to first
token, vision encoder time and decode ms/token. ``--prompt TEXT`` answers one message and exits.
"""
import argparse
import os
import re
import sys
import warnings

import torch

from tinyq.generate import ContextOverflowError
from tinyq.models.vlm import IMAGE_MARKER, load_vlm
from tinyq.vlm.session import VLMChatSession

RANDOM_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  --random-tiny: this model has RANDOM WEIGHTS. Its answers are NOISE.     !!
!!  It only shows the pipeline running (tiling, tower, projector, LLM, chat). !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


COMMANDS = "/image PATH[,PATH]  /video PATH  /drop (media not yet sent)  /forget (oldest exchange)  /reset  /exit"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="llava-hf or VILA/NVILA directory")
    src.add_argument("--random-tiny", action="store_true", help="a small NVILA-shaped model with RANDOM weights")
    p.add_argument("--image", help="image path(s), comma-separated, for the first message")
    p.add_argument("--video", help="video file (mp4 needs PyAV), animated GIF or directory of frames")
    p.add_argument("--frames", type=int, default=None,
                   help="frames sampled uniformly from --video; a clip with fewer is an error (default: the "
                        "checkpoint's num_video_frames, else 8, repeating frames of a shorter clip as VILA does)")
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
    if args.prompt is not None and not args.prompt.strip():  # a script's empty question: not the interactive chat
        p.error("--prompt is empty: give the message to answer")
    return args


def one_path(text: str) -> str:
    """A path as typed: spaces around and one pair of matching quotes (a path dragged into a
    terminal comes quoted) removed, ``~`` expanded."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return os.path.expanduser(text)


def image_paths(text: str) -> list:
    """The paths in ``--image`` / ``/image`` text: comma-separated (see :func:`one_path`), unless the
    whole text names a file, which is then the one path (its name may hold commas)."""
    whole = one_path(text)
    if os.path.isfile(whole):
        return [whole]
    return [one_path(p) for p in text.split(",") if p.strip()]


def add_media(chat, images=None, video=None, frames=None):
    """Encode media now; prints what was added. Returns False (and says why) on bad input."""
    try:
        if images:
            counts = chat.add_images(image_paths(images))
            print(f"[{len(counts)} image(s), {sum(counts)} tokens, vision {vision_ms(chat)}]")
        if video:
            counts = chat.add_video(one_path(video), frames)
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
    if IMAGE_MARKER in text:
        print(f"[{IMAGE_MARKER} in a message is text, not an image, and is removed; /image adds images]")
    try:
        with warnings.catch_warnings():  # the session's warning says the same in API terms
            warnings.filterwarnings("ignore", message=f"{IMAGE_MARKER} in the message is text")
            turn = chat.send(text)
        print("assistant> ", end="", flush=True)
        for delta in turn:
            print(delta, end="", flush=True)
    except ContextOverflowError:
        print(f"error: {context_full(chat, text)}")
        return False
    except ValueError as exc:  # e.g. a message that is not valid text
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


def context_full(chat, text) -> str:
    """The session's context-full error in this script's terms (it names API calls: reset(),
    drop_oldest_turns()); nothing was sent, and the history is kept."""
    need = len(chat.prompt_ids(text)) + 1  # the prompt and the answer's first token
    pending = chat.pending_images
    waiting = f", with the {pending} media item(s) added for it," if pending else ""
    ways = "/drop discards the media not yet sent, " if pending else ""
    ways += "/forget drops the oldest exchange (with its media), " if chat.turns else ""
    return (f"this message{waiting} needs {need} tokens of context (history: {chat.turns} turns) but "
            f"--max-seq-len is {chat.max_seq_len}; nothing was sent and the history is kept: {ways}/reset "
            "starts a new conversation")


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
            calib = [load_image(p) for p in image_paths(args.vision_calib or "")]
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
    if args.prompt is not None:
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
        elif line == "/drop":
            dropped = chat.drop_pending_media()
            print(f"[{dropped} media item(s) not yet sent dropped]" if dropped else "[no media waiting to be sent]")
        elif line == "/forget":
            print("[the oldest exchange and its media forgotten]" if chat.drop_oldest_turns(1)
                  else "[no exchange to forget]")
        elif line.startswith("/image ") and line[len("/image "):].strip():
            add_media(chat, images=line[len("/image "):])
        elif line.startswith("/video ") and line[len("/video "):].strip():
            add_media(chat, video=line[len("/video "):], frames=args.frames)
        elif line.startswith("/") and line.split()[0] in ("/image", "/video", "/drop", "/forget", "/reset", "/exit"):
            print(f"usage: {COMMANDS}")  # a command without its path, or with extra words
        elif re.fullmatch(r"/[a-z]+", line.split()[0]):  # a mistyped command, not a message like "/etc/hosts?"
            print(f"unknown command {line.split()[0]}; {COMMANDS}")
        elif answer(chat, line) and args.random_tiny:
            print("(random weights: the answer above is noise)")


if __name__ == "__main__":
    sys.exit(main())
