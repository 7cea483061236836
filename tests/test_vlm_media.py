"""Media input (image reading, LLaVA padding, video frame sampling), load_vlm dispatch and the
examples/chat_vlm.py script on the random tiny model."""
import importlib.util
import os
import sys

import pytest
import torch

from tinyq.models.vlm import expand_images, load_vlm
from tinyq.vlm import media


def _frames(n, size=(20, 10)):
    from PIL import Image

    # green tells frames apart past i = 25, where red saturates (a GIF merges equal frames)
    return [Image.new("RGB", size, (10 * i, i, 0)) for i in range(n)]


def test_uniform_indices_hand_computed():
    assert media.uniform_indices(10, 4) == [0, 3, 6, 9]  # 0, 3, 6, 9 exactly
    assert media.uniform_indices(3, 3) == [0, 1, 2]
    assert media.uniform_indices(8, 5) == [0, 2, 4, 5, 7]  # 0, 1.75, 3.5, 5.25, 7: 3.5 rounds to even
    assert media.uniform_indices(7, 1) == [0]
    assert media.uniform_indices(3, 8) == [0, 0, 1, 1, 1, 1, 2, 2]  # VILA's round(linspace(0, 2, 8)): repeats


def test_frames_from_directory_and_gif(tmp_path):
    frames = _frames(10)
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(frames):
        f.save(d / f"f{i:02d}.png")
    (d / "notes.txt").write_text("ignored")
    got = media.load_video_frames(str(d), 4)
    assert [f.getpixel((0, 0))[0] for f in got] == [0, 30, 60, 90]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    got = media.load_video_frames(str(gif), 4)
    assert len(got) == 4 and all(f.size == (20, 10) and f.mode == "RGB" for f in got)
    assert [f.getpixel((0, 0))[0] for f in got] == [0, 30, 60, 90]
    # more frames than the clip has: an error saying how many it has, or (asked for) repeats, as VILA's
    with pytest.raises(ValueError, match=r"clip.gif has 10 frame\(s\), fewer than the 12 asked for: ask for at most 10"):
        media.load_video_frames(gif, 12)
    got = media.load_video_frames(gif, 12, repeat_short=True)  # an os.PathLike path
    picked = [f.getpixel((0, 0))[0] // 10 for f in got]
    assert picked == media.uniform_indices(10, 12) == [0, 1, 2, 2, 3, 4, 5, 6, 7, 7, 8, 9]
    short = tmp_path / "short.gif"
    frames[0].save(short, save_all=True, append_images=frames[1:3], duration=40)
    got = media.load_video_frames(str(short), 8, repeat_short=True)
    assert [f.getpixel((0, 0))[0] for f in got] == [0, 0, 10, 10, 10, 10, 20, 20]
    with pytest.raises(ValueError, match="short.gif has 3 frame"):
        media.load_video_frames(str(short), 4)
    with pytest.raises(ValueError, match=rf"video {d} has 10 frame\(s\), fewer than the 11 asked for"):
        media.load_video_frames(str(d), 11)
    assert [f.getpixel((0, 0))[0] for f in media.load_video_frames(str(d), 11, repeat_short=True)] == \
        [10 * i for i in media.uniform_indices(10, 11)]
    with pytest.raises(ValueError, match="video not found"):
        media.load_video_frames(str(tmp_path / "none.mp4"), 2)


def test_a_frames_directory_without_frames_says_so(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "notes.txt").write_text("not a frame")
    with pytest.raises(ValueError, match=rf"frames directory {d} has no frame images \(files ending in \.jpg, "
                                         r"\.jpeg, \.png, \.bmp, \.webp\)"):
        media.load_video_frames(str(d), 8)


def test_image_input_without_pillow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow absent (the vlm extra not installed)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r"image input needs Pillow: pip install 'tinyq\[vlm\]'"):
        media.load_image(str(tmp_path / "a.png"))


def test_mp4_without_pyav_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV absent, whether or not this machine has it
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="needs PyAV"):
        media.load_video_frames(str(f), 2)


def test_mp4_frames_sampled_uniformly(tmp_path):
    """An mp4 written by PyAV itself: 10 frames whose red channel encodes their index; the 4 sampled
    are those of uniform_indices, in order; asking for 11 is an error unless frames may repeat."""
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            img = np.zeros((48, 64, 3), dtype=np.uint8)
            img[..., 0] = 20 * i + 10
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    frames = media.load_video_frames(str(path), 4)
    assert [f.size for f in frames] == [(64, 48)] * 4
    reds = [float(np.asarray(f)[..., 0].mean()) for f in frames]
    assert [round((r - 10) / 20) for r in reds] == media.uniform_indices(10, 4)  # lossy codec: within half a step
    with pytest.raises(ValueError, match="has 10 frame"):
        media.load_video_frames(str(path), 11)
    reds = [float(np.asarray(f)[..., 0].mean()) for f in media.load_video_frames(str(path), 11, repeat_short=True)]
    assert [round((r - 10) / 20) for r in reds] == media.uniform_indices(10, 11)  # one frame repeated


def test_images_reach_the_model_as_transformers_loads_them(tmp_path):
    """Transparency laid on white (transformers' convert_to_rgb), EXIF orientation applied (its
    load_image), and a 16-bit grey image scaled to 8 bits rather than clipped white."""
    import numpy as np
    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (10, 200, 30, 0))  # fully transparent
    out = media.load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 200, 30)
    photo = Image.new("RGB", (60, 40), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.save(tmp_path / "p.jpg", exif=exif)
    assert media.load_image(str(tmp_path / "p.jpg")).size == (40, 60)
    ramp = (np.arange(256 * 4, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # mode I;16
    grey = np.asarray(media.load_image(str(tmp_path / "deep.png")))[..., 0]
    assert abs(float(grey.mean()) - 127.5) < 2 and (grey == 255).mean() < 0.01


def _image_in_mode(mode):
    """A random 5 x 7 image in ``mode``; "+t" adds a transparent colour (``info["transparency"]``, as a
    PNG's tRNS chunk loads) equal to the top-left pixel."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base, _, transparent = mode.partition("+")
    rgba = Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA")
    rgba.putpixel((1, 0), rgba.getpixel((1, 0))[:3] + (0,))  # one fully transparent pixel
    image = rgba if base == "RGBA" else rgba.convert("RGB" if base == "P" else base)
    if base == "P":  # a palette image: quantized, the way a GIF or palette PNG holds one
        image = image.quantize(colors=16)
    if transparent:
        image.info["transparency"] = image.getpixel((0, 0))
    return image


TRANSFORMERS_MODES = ["1", "L", "L+t", "LA", "RGBA", "P", "P+t", "PA", "RGB", "RGB+t", "CMYK", "F", "RGBa", "YCbCr"]


@pytest.mark.parametrize("mode", TRANSFORMERS_MODES)
def test_to_rgb_matches_transformers_convert_to_rgb(mode):
    """Every mode transformers' convert_to_rgb takes gives its pixels exactly: transparency (an alpha
    band, or a transparent colour in ``info``) laid on white, everything else converted by Pillow."""
    import inspect

    import numpy as np
    from transformers.image_transforms import convert_to_rgb

    if "return_numpy" not in inspect.signature(convert_to_rgb).parameters:
        pytest.skip("transformers < 5 composites by another rule (every non-RGB image)")
    image = _image_in_mode(mode)
    want = convert_to_rgb(image.copy(), return_numpy=True)
    got = media.to_rgb(image.copy())
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)


def test_transparency_is_laid_on_white_in_every_form():
    """Hand-checked pixels: a transparent colour in a grey, palette or RGB image turns white, and so does
    a transparent pixel of PA and of premultiplied La (which transformers cannot convert at all)."""
    import numpy as np
    from PIL import Image

    for mode in ("L+t", "P+t", "RGB+t"):
        image = _image_in_mode(mode)
        transparent = np.asarray(image) == np.asarray(image.info["transparency"])  # [H, W(, C)]
        transparent = transparent.reshape(*transparent.shape[:2], -1).all(-1)  # [H, W]
        out, plain = np.asarray(media.to_rgb(image)), np.asarray(image.convert("RGB"))
        assert transparent[0, 0] and (out[transparent] == 255).all(), mode
        assert np.array_equal(out[~transparent], plain[~transparent]), mode  # the rest as it was
    for mode in ("PA", "LA", "La"):
        image = _image_in_mode("RGBA").convert("PA" if mode == "PA" else "LA").convert(mode)
        assert media.to_rgb(image).getpixel((1, 0)) == (255, 255, 255), mode  # the pixel of alpha 0
    grey = Image.new("LA", (2, 1), (100, 255))
    grey.putpixel((1, 0), (100, 0))
    assert [media.to_rgb(grey.convert("La")).getpixel((x, 0)) for x in (0, 1)] == [(100,) * 3, (255,) * 3]


def test_expand_to_square_pads_with_the_mean_colour():
    from PIL import Image

    im = Image.new("RGB", (4, 2), (255, 255, 255))
    sq = media.expand_to_square(im, media.CLIP_MEAN)
    assert sq.size == (4, 4)
    assert sq.getpixel((0, 0)) == tuple(int(m * 255) for m in media.CLIP_MEAN)  # top pad row
    assert sq.getpixel((0, 1)) == (255, 255, 255)  # the image, centred: rows 1-2
    assert sq.getpixel((0, 3)) != (255, 255, 255)


def test_tower_processors_follow_published_rules():
    from PIL import Image

    im = Image.new("RGB", (30, 20), (255, 0, 127))
    sig = media.pixel_values(media.image_processor("siglip", 28), [im])
    assert sig.shape == (1, 3, 28, 28)
    torch.testing.assert_close(sig[0, :, 5, 5], torch.tensor([1.0, -1.0, 127 / 255 * 2 - 1]), atol=1e-2, rtol=0)
    clip = media.pixel_values(media.image_processor("clip", 28), [im])
    want = (torch.tensor([1.0, 0.0, 127 / 255]) - torch.tensor(media.CLIP_MEAN)) / torch.tensor(media.CLIP_STD)
    torch.testing.assert_close(clip[0, :, 5, 5], want, atol=2e-2, rtol=0)


def test_placeholder_expansion_and_count_errors():
    assert expand_images([[1], [2, 3], [4]], [[9, 9], [8]]) == [1, 9, 9, 2, 3, 8, 4]
    with pytest.raises(ValueError, match="2 <image> placeholder.*1 image"):
        expand_images([[1], [2], [3]], [[9]])


@pytest.mark.parametrize("family", ["llava", "nvila"])
def test_load_vlm_reads_both_layouts(tmp_path, family):
    """A llava-hf folder and a VILA/NVILA one (llm/, vision_tower/, mm_projector/) load through the one
    entry point, on the CPU, and answer a one-image message."""
    from tests.vlm_tiny import make_llava_dir, make_nvila_dir
    from tinyq.models.llava import LlavaModel
    from tinyq.models.nvila import NvilaModel
    from tinyq.vlm.session import VLMChatSession

    (make_llava_dir(tmp_path, "siglip", "qwen2") if family == "llava" else make_nvila_dir(tmp_path))
    model, tok = load_vlm(str(tmp_path), "fp32", device="cpu", max_seq_len=512)
    assert isinstance(model, LlavaModel if family == "llava" else NvilaModel)
    s = VLMChatSession(model, tok, max_seq_len=512, temperature=0, max_new_tokens=3)
    s.gen.eos_ids = set()
    s.add_images(_frames(1, (40, 30)))
    assert len(s.ask("what?").token_ids) == 3
    # the chat template is every family's to ask for; a VILA-1.5 format is not llava-hf's
    assert load_vlm(str(tmp_path), "fp32", device="cpu", max_seq_len=64, conversation=None)[0].conversation is None
    if family == "llava":
        with pytest.raises(ValueError, match="conversation formats are VILA-1.5's"):
            load_vlm(str(tmp_path), "fp32", device="cpu", conversation="vicuna_v1")


def test_load_vlm_rejects_other_folders(tmp_path):
    with pytest.raises(ValueError, match="neither a llava-hf"):
        load_vlm(str(tmp_path))


def _chat_vlm_example():
    """examples/chat_vlm.py as a module."""
    spec = importlib.util.spec_from_file_location(
        "chat_vlm", os.path.join(os.path.dirname(__file__), "..", "examples", "chat_vlm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chat_vlm_example_runs_the_random_tiny_model(tmp_path, capsys):
    mod = _chat_vlm_example()
    img = tmp_path / "a.png"
    _frames(1, (90, 60))[0].save(img)
    assert mod.main(["--random-tiny", "--image", f"{img},{img}", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "2 image(s)" in out and "TTFT" in out and "vision encoder" in out
    assert mod.main(["--random-tiny", "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 1
    assert "image not found" in capsys.readouterr().out
    # a precision the random model cannot take here is named, not silently replaced
    assert mod.main(["--random-tiny", "--precision", "w4a16", "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    assert "runs in fp32 here; --precision w4a16 applies to real checkpoints" in capsys.readouterr().out
    # the W8A8 SmoothQuant tower, calibrated on an image, runs the same chat
    assert mod.main(["--random-tiny", "--image", str(img), "--vision-precision", "w8a8", "--vision-calib", str(img),
                     "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "W8A8, SmoothQuant calibrated on 1 image(s)" in out and "TTFT" in out
    assert mod.main(["--random-tiny", "--vision-precision", "w8a8", "--vision-calib", str(tmp_path / "nope.png"),
                     "--prompt", "hi"]) == 1
    assert "image not found" in capsys.readouterr().out
    # --video at start-up: a directory of frames, sampled
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(_frames(5, (40, 40))):
        frame.save(frames_dir / f"{i:03d}.png")
    assert mod.main(["--random-tiny", "--video", str(frames_dir), "--frames", "3", "--prompt", "hi",
                     "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "[video: 3 frames" in out and "TTFT" in out
    # a folder that is no model: a one-line error, not a traceback
    assert mod.main(["--model", str(tmp_path), "--prompt", "hi"]) == 1
    assert capsys.readouterr().out.startswith("error: ")
    # a VILA-1.5-named checkpoint: its legacy format by default, named at load; the tokenizer's template
    # on request; a format whose answer-ending token the tokenizer lacks is an error, not a traceback
    from tests.vlm_tiny import make_nvila_dir

    vila = tmp_path / "Llama-3-VILA1.5-8B"
    make_nvila_dir(vila, projector="mlp_downsample", s2=False, image_size=35)
    assert mod.main(["--model", str(vila), "--precision", "fp32", "--prompt", "hi"]) == 1
    out = capsys.readouterr().out
    assert "llama_3 conversation format" in out and "error: the 'llama_3' conversation format ends answers" in out
    assert mod.main(["--model", str(vila), "--precision", "fp32", "--conversation", "template", "--prompt", "hi",
                     "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "fp32, chat template" in out and "TTFT" in out


def test_chat_vlm_example_interactive_commands(tmp_path, capsys, monkeypatch):
    """The terminal loop: a sampled answer (--temperature), /image and /video adding media to the next
    message only, /reset forgetting them, /exit ending before later lines are read."""
    mod = _chat_vlm_example()
    img = tmp_path / "a.png"
    _frames(1, (90, 60))[0].save(img)
    gif = tmp_path / "clip.gif"
    frames = _frames(6, (40, 40))
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    lines = iter(["hello", "/image", "/imgae x.png", f"/image {img}", f"/image {img}", "what is it?", f"/video {gif}",
                  "and this?", "/reset", "hello", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert mod.main(["--random-tiny", "--temperature", "0.7", "--frames", "3", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    # a command without its path, or a mistyped one, is not sent to the model
    assert out.count("assistant> ") == 4 and "[conversation and media forgotten]" in out
    assert "usage: /image PATH" in out and "unknown command /imgae" in out
    assert next(lines) == "never read"
    ttft = [line for line in out.splitlines() if line.startswith("[TTFT")]
    prefilled = [int(line.split("(")[1].split(" tokens")[0]) for line in ttft]
    vision = [line.split("vision encoder ")[1].split(" ms")[0] for line in ttft]
    video_rows = int(out.split("[video: 3 frames, ")[1].split(" tokens")[0])
    # the image was added twice for one message: encoded together, one tile each, like the video's frames
    image_rows = 2 * video_rows // 3
    # the image turn and the video turn prefill their rows besides the text; after /reset the first
    # message is prefilled from an empty context again, with no media
    assert prefilled[1] > image_rows and prefilled[2] > video_rows and prefilled[3] == prefilled[0]
    assert vision[0] == vision[3] == "0"
    # the image turn's encoder time counts both of its /image adds
    added = [float(x.split("vision ")[1].split(" ms")[0]) for x in out.splitlines() if x.startswith("[1 image(s)")]
    assert abs(float(vision[1]) - sum(added)) <= 2  # each printed rounded to 1 ms


def test_w8a8_tower_in_a_vlm_stays_close_to_the_float_one():
    """quantize_vlm_tower_ on a (random) NVILA-shaped model: the projected image features of an image
    it was not calibrated on stay close to the float model's."""
    from tinyq.models.vision_w8a8 import cosine_similarity, quantize_vlm_tower_
    from tinyq.vlm.tiny import random_tiny_nvila

    model, _ = random_tiny_nvila()
    calib, probe = _frames(2, (70, 50))
    with torch.inference_mode():
        ref = model.encode_images([probe])[0]
        quantize_vlm_tower_(model, [calib])
        out = model.encode_images([probe])[0]
    assert out.shape == ref.shape and cosine_similarity(out, ref) > 0.99


def test_session_warm_up_leaves_it_empty():
    from tinyq.vlm.session import VLMChatSession
    from tinyq.vlm.tiny import random_tiny_nvila

    model, tok = random_tiny_nvila()
    s = VLMChatSession(model, tok, max_seq_len=256, max_new_tokens=2)
    report = s.warm_up()
    assert report.seconds > 0 and s.images == [] and s.gen.cache.length == 0 and s.gen.cached_ids == []
    s.add_images(_frames(1, (60, 40)))
    assert s.last_vision_s > 0 and s.last_vision_compile_s == 0  # CPU: nothing compiles
    with pytest.raises(ValueError, match="empty session"):
        s.warm_up()
    # a system prompt is not conversation: a session with one warms up too
    s = VLMChatSession(model, tok, max_seq_len=256, max_new_tokens=2, system_prompt="Be brief.")
    assert s.warm_up().seconds > 0 and s.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_vlm_survives_ctrl_c_and_bad_frame_counts(tmp_path, capsys, monkeypatch):
    """Ctrl-C while an answer streams discards that turn and the chat goes on; --frames 0 is refused."""
    from tinyq.vlm.session import VLMChatSession

    mod = _chat_vlm_example()
    real_send, calls = VLMChatSession.send, []

    def send(self, text, sampling=None):
        calls.append(text)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_send(self, text, sampling)

    monkeypatch.setattr(VLMChatSession, "send", send)
    lines = iter(["first", "second", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert mod.main(["--random-tiny", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "[interrupted: this turn was discarded]" in out and out.count("[TTFT") == 1
    gif = tmp_path / "clip.gif"
    frames = _frames(3, (40, 40))
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    assert mod.main(["--random-tiny", "--video", str(gif), "--frames", "0", "--prompt", "hi"]) == 1
    assert "num_frames must be a positive int, got 0" in capsys.readouterr().out


def test_image_markers_are_written_as_each_family_writes_them(tmp_path):
    """NVILA/VILA: the marker straight before the text (the placeholder ends in its own "\\n" row);
    LLaVA: "<image>\\n" before the text. The markers come from the message's media record."""
    from tinyq.models.llava import LlavaModel
    from tinyq.vlm.session import VLMChatSession
    from tinyq.vlm.tiny import random_tiny_nvila

    model, tok = random_tiny_nvila()
    s = VLMChatSession(model, tok, max_seq_len=512, max_new_tokens=2)
    s.add_images(_frames(2, (40, 40)))
    assert "user\n<image><image>what is this?<|im_end|>" in s._render([{"role": "user", "content": "what is this?",
                                                                       "media": 2}])
    assert model.placeholder_ids(s.images[0], tok)[-len(model.newline_ids):] == tok.encode("\n", add_special_tokens=False)
    from tests.vlm_tiny import make_llava_dir

    make_llava_dir(tmp_path, "clip", "llama")
    llava, ltok = load_vlm(str(tmp_path), "fp32", device="cpu", max_seq_len=512)
    assert isinstance(llava, LlavaModel)
    s = VLMChatSession(llava, ltok, max_seq_len=512, max_new_tokens=2)
    assert "<image>\nwhat is this?" in s._render([{"role": "user", "content": "what is this?", "media": 1}])


def test_chat_vlm_paths_with_commas_tilde_and_quotes(tmp_path, capsys, monkeypatch):
    """A file whose name holds a comma is one path; ~ is expanded; a path dragged into a terminal
    (quoted) is unquoted; several paths are still comma-separated. /drop discards what was added."""
    mod = _chat_vlm_example()
    (tmp_path / "imgs").mkdir()
    for name in ("beach, sunset.png", "my photo.png", "a.png"):
        _frames(1, (60, 40))[0].save(tmp_path / "imgs" / name)
    gif = tmp_path / "imgs" / "my clip.gif"
    frames = _frames(3, (40, 40))
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    comma = str(tmp_path / "imgs" / "beach, sunset.png")
    assert mod.main(["--random-tiny", "--image", comma, "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert "[1 image(s)" in capsys.readouterr().out
    monkeypatch.setenv("HOME", str(tmp_path))
    a = tmp_path / "imgs" / "a.png"
    lines = iter(["/image ~/imgs/my photo.png", f"/image '{tmp_path}/imgs/my photo.png'", f'/image "{comma}"',
                  f"/image {a}, ~/imgs/a.png", '/video "~/imgs/my clip.gif"', "/drop", "/drop", "hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert mod.main(["--random-tiny", "--frames", "3", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "error" not in out and out.count("[1 image(s)") == 3 and "[2 image(s)" in out and "[video: 3 frames" in out
    assert "[6 media item(s) not yet sent dropped]" in out and "[no media waiting to be sent]" in out
    assert "vision encoder 0 ms" in out  # the message went without the dropped media
    assert mod.image_paths("x.png, y.png") == ["x.png", "y.png"]


def test_chat_vlm_context_full_speaks_cli(tmp_path, capsys, monkeypatch):
    """A video too long for --max-seq-len is refused when added, so later messages still work; a
    message that does not fit with the media waiting for it suggests /drop, /forget and /reset (not the API's
    reset() / drop_oldest_turns()), and /drop lets it through with the history kept."""
    mod = _chat_vlm_example()
    gif = tmp_path / "clip.gif"
    frames = _frames(32, (40, 40))
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    img = tmp_path / "a.png"
    _frames(1, (70, 50))[0].save(img)
    long = "y" * 60
    lines = iter(["hello", f"/video {gif}", "what happens?", f"/image {img}", long, "/drop", long, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert mod.main(["--random-tiny", "--frames", "32", "--max-seq-len", "200", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert f"error: video {gif} (32 frames): " in out and "nothing was added" in out
    assert "error: this message, with the 1 media item(s) added for it, needs " in out
    assert "--max-seq-len is 200; nothing was sent and the history is kept: /drop discards the media not yet sent, " \
           "/forget drops the oldest exchange (with its media), /reset starts a new conversation" in out
    assert "reset()" not in out and "drop_oldest_turns" not in out
    assert "[1 media item(s) not yet sent dropped]" in out and out.count("[TTFT") == 3


def test_chat_vlm_forget_makes_room_and_keeps_the_rest(tmp_path, capsys, monkeypatch):
    """When the history fills the context, the hint offers /forget, which drops the oldest exchange
    (its image with it) so the message fits, the later exchanges kept."""
    mod = _chat_vlm_example()
    img = tmp_path / "a.png"
    _frames(1, (70, 50))[0].save(img)
    long = "y" * 60
    lines = iter(["/forget", f"/image {img}", "first", "second", long, "/forget", long, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sessions = []
    real = mod.VLMChatSession

    def spy(*a, **k):
        sessions.append(real(*a, **k))
        return sessions[-1]

    monkeypatch.setattr(mod, "VLMChatSession", spy)
    assert mod.main(["--random-tiny", "--max-seq-len", "200", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[no exchange to forget]" in out
    assert "/forget drops the oldest exchange (with its media), /reset starts a new conversation" in out
    assert "[the oldest exchange and its media forgotten]" in out and out.count("[TTFT") == 3
    chat = sessions[0]
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["second", long]
    assert chat.pending_images == 0 and len(chat._items) == 0  # the image went with its exchange


def test_chat_vlm_bad_text_and_empty_prompt(capsys, monkeypatch):
    """A line that is not valid text is an error and the chat goes on; <image> typed in a message is
    text, said so in the chat's terms; --prompt '' is a usage error (exit code 2), not the interactive chat."""
    mod = _chat_vlm_example()
    lines = iter(["hello", "caf\udce9?", "still there?", "what is <image>?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert mod.main(["--random-tiny", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "error: the message is not valid text (surrogates not allowed at character 3)" in out
    assert "[<image> in a message is text, not an image, and is removed; /image adds images]" in out
    assert out.count("[TTFT") == 3 and out.count("(random weights") == 3  # not after the error
    for empty in ("", "   "):
        with pytest.raises(SystemExit) as exc:
            mod.main(["--random-tiny", "--prompt", empty])
        assert exc.value.code == 2 and "--prompt is empty" in capsys.readouterr().err
