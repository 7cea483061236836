"""Media input (image reading, LLaVA padding, video frame sampling), load_vlm dispatch and the
examples/chat_vlm.py script on the random tiny model."""
import importlib.util
import os

import pytest
import torch

from tinyq.models.vlm import expand_images, load_vlm
from tinyq.vlm import media


def _frames(n, size=(20, 10)):
    from PIL import Image

    return [Image.new("RGB", size, (10 * i, 0, 0)) for i in range(n)]


def test_uniform_indices_hand_computed():
    assert media.uniform_indices(10, 4) == [1, 3, 6, 8]  # centres of 4 spans of 2.5 frames
    assert media.uniform_indices(3, 3) == [0, 1, 2]


def test_frames_from_directory_and_gif(tmp_path):
    frames = _frames(10)
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(frames):
        f.save(d / f"f{i:02d}.png")
    (d / "notes.txt").write_text("ignored")
    got = media.load_video_frames(str(d), 4)
    assert [f.getpixel((0, 0))[0] for f in got] == [10, 30, 60, 80]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    got = media.load_video_frames(str(gif), 4)
    assert len(got) == 4 and all(f.size == (20, 10) and f.mode == "RGB" for f in got)
    assert [f.getpixel((0, 0))[0] for f in got] == [10, 30, 60, 80]
    with pytest.raises(ValueError, match="has 10 frame.*fewer than the 12"):
        media.load_video_frames(str(gif), 12)
    with pytest.raises(ValueError, match="video not found"):
        media.load_video_frames(str(tmp_path / "none.mp4"), 2)


@pytest.mark.skipif(importlib.util.find_spec("av") is not None, reason="PyAV installed")
def test_mp4_without_pyav_says_what_to_install(tmp_path):
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="needs PyAV"):
        media.load_video_frames(str(f), 2)


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


def test_load_vlm_rejects_other_folders(tmp_path):
    with pytest.raises(ValueError, match="neither a llava-hf"):
        load_vlm(str(tmp_path))


def test_chat_vlm_example_runs_the_random_tiny_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "chat_vlm", os.path.join(os.path.dirname(__file__), "..", "examples", "chat_vlm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    img = tmp_path / "a.png"
    _frames(1, (90, 60))[0].save(img)
    assert mod.main(["--random-tiny", "--image", f"{img},{img}", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "2 image(s)" in out and "TTFT" in out and "vision encoder" in out
    assert mod.main(["--random-tiny", "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 1
    assert "image not found" in capsys.readouterr().out
    # the W8A8 SmoothQuant tower, calibrated on an image, runs the same chat
    assert mod.main(["--random-tiny", "--image", str(img), "--vision-precision", "w8a8", "--vision-calib", str(img),
                     "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "W8A8, SmoothQuant calibrated on 1 image(s)" in out and "TTFT" in out
    assert mod.main(["--random-tiny", "--vision-precision", "w8a8", "--vision-calib", str(tmp_path / "nope.png"),
                     "--prompt", "hi"]) == 1
    assert "image not found" in capsys.readouterr().out


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
