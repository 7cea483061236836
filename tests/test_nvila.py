"""NVILA / NVILA-Lite / VILA-1.5 vs a reference assembled from transformers parts (SiglipVisionModel +
plain-torch VILA projector + Qwen2ForCausalLM with inputs_embeds) following the published code
(NVlabs/VILA llava/mm_utils.py, base_projector.py; sglang python/sglang/srt/models/nvila.py);
tiling and token counts against hand-computed values."""
import re

import pytest
import torch
import torch.nn.functional as F

from tests.vlm_tiny import halve_columns, make_nvila_dir
from tinyq.models.nvila import load_nvila, s2_grid, s2_tiles, s2_token_count
from tinyq.vlm.session import VLMChatSession

NVILA_SCALES = [448, 896, 1344]


# ---------------------------------------------------------------- hand-computed tiling


@pytest.mark.parametrize("size,grid,tokens,lite_tokens", [
    ((1344, 896), (4, 3), 12 * 256, 12 * 121),  # aspect 1.5: 4 x 3 (1.33) beats 3 x 3 (1.0) and 5 x 2 (2.5)
    ((448, 448), (3, 3), 9 * 256, 9 * 121),  # square: the minimum 9 tiles
    ((500, 1500), (2, 6), 12 * 256, 12 * 121),  # aspect 1/3: exactly 2 x 6
    # aspect 6: 9 x 1 and 6 x 2 tie (|6 - 9| = |6 - 3| = 3); the image's 1.5 MP exceed half of the
    # 6 x 2 grid's 2.4 MP, so the larger grid wins
    ((3000, 500), (6, 2), 12 * 256, 12 * 121),
])
def test_nvila_grid_and_token_counts(size, grid, tokens, lite_tokens):
    assert s2_grid(*size, NVILA_SCALES, 12) == grid
    # a 448 tile is 32 x 32 patches; 2x2 -> 16 x 16 = 256 tokens per block, 3x3 (padded to 33) -> 11 x 11 = 121
    assert s2_token_count(*size, NVILA_SCALES, 12, grid=32, k=2) == tokens
    assert s2_token_count(*size, NVILA_SCALES, 12, grid=32, k=3) == lite_tokens


def test_s2_tiles_of_a_1344x896_image():
    from PIL import Image

    tiles, (rows, cols) = s2_tiles(Image.new("RGB", (1344, 896)), NVILA_SCALES, 12)
    assert (rows, cols) == (3, 4)
    assert len(tiles) == 1 + 4 + 12 and all(t.size == (448, 448) for t in tiles)


# ---------------------------------------------------------------- reference pipeline (published code)


def ref_s2_tiles(image, scales, max_num, size):
    """VILA ``dynamic_s2_preprocess``: square grids for all but the last scale, then the closest
    aspect ratio with ``min_num <= cols * rows <= max_num``; returns tiles and (rows, cols)."""
    w, h = image.size
    min_num = (scales[-1] // scales[0]) ** 2
    out = []
    for s in scales[:-1]:
        n = s // scales[0]
        im = image.resize((size * n, size * n))
        out += [im.crop(((i % n) * size, (i // n) * size, (i % n + 1) * size, (i // n + 1) * size)) for i in range(n * n)]
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        d = abs(w / h - r[0] / r[1])
        if d < best_diff or (d == best_diff and w * h > 0.5 * size * size * r[0] * r[1]):
            best, best_diff = r, d
    tw, th = size * best[0], size * best[1]
    im = image.resize((tw, th))
    n = tw // size
    out += [im.crop(((i % n) * size, (i // n) * size, (i % n + 1) * size, (i // n + 1) * size))
            for i in range(best[0] * best[1])]
    return out, (best[1], best[0])


def merge_chessboard(x, nh, nw):
    """sglang ``merge_chessboard``: ``[nh*nw*b, c, h, w]`` (or ``[.., n, c]``) -> ``[b, c, nh*h, nw*w]``."""
    if x.dim() == 3:
        g = int(x.shape[1] ** 0.5)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, g, g)
    b = x.shape[0] // (nh * nw)
    return torch.cat([torch.cat([x[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], dim=-1)
                      for i in range(nh)], dim=-2)


def split_chessboard(x, nh, nw):
    h, w = x.shape[2] // nh, x.shape[3] // nw
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(nh) for j in range(nw)], dim=0)


def ref_features(tower, proj, pixels, block, scales):
    """sglang ``NVILAForConditionalGeneration.get_image_feature`` for one image."""
    hs = tower(pixels, output_hidden_states=True).hidden_states[-2]  # [tiles, g*g, C]
    if block is None:  # several images: one tile each, repeated over the scales
        g = int(hs.shape[1] ** 0.5)
        x = hs.transpose(1, 2).reshape(1, -1, g, g).repeat(1, len(scales), 1, 1)
        block = (1, 1)
    else:
        maps, cnt = [], 0
        for s in scales[:-1]:
            n = s // scales[0]
            maps.append(merge_chessboard(hs[cnt:cnt + n * n], n, n))
            cnt += n * n
        maps.append(merge_chessboard(hs[cnt:], *block))
        size = maps[-1].shape[-2:]
        x = torch.cat([F.interpolate(m, size=size, mode="area") for m in maps], dim=1)
    blocks = split_chessboard(x, *block)
    out = proj(blocks.flatten(2).transpose(1, 2))
    return merge_chessboard(out, *block)[0].flatten(1).t()


def ref_rows(parts, images, s2=True):
    tower, proj, _, _, root = parts
    from transformers import SiglipImageProcessor

    scales = [int(s) for s in root["s2_scales"].split(",")]
    proc = SiglipImageProcessor(size={"height": scales[0], "width": scales[0]})
    px = lambda ims: proc(images=ims, return_tensors="pt")["pixel_values"]  # noqa: E731
    with torch.no_grad():
        if not s2:
            return list(proj(tower(px(images), output_hidden_states=True).hidden_states[-2]))
        if len(images) == 1:
            tiles, block = ref_s2_tiles(images[0], scales, root["max_tiles"], scales[0])
            return [ref_features(tower, proj, px(tiles), block, scales)]
        return [ref_features(tower, proj, px([im]), None, scales) for im in images]


def ref_logits(parts, ids, rows):
    llm, img = parts[2], parts[3].convert_tokens_to_ids("<image>")
    with torch.no_grad():
        emb = llm.get_input_embeddings()(ids).clone()
        emb[0, ids[0] == img] = torch.cat(rows)
        return llm(inputs_embeds=emb).logits


def _image(w, h, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


# ---------------------------------------------------------------- equivalence


@pytest.fixture(scope="module", params=["nvila", "nvila-lite", "vila1.5"])
def nvila(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    kw = {"nvila": {}, "nvila-lite": {"projector": "mlp_downsample_3x3_fix"},
          "vila1.5": {"projector": "mlp_downsample", "s2": False, "image_size": 35}}[request.param]
    parts = make_nvila_dir(path, **kw)
    model, tok = load_nvila(str(path), precision="fp32", device="cpu", max_seq_len=512)
    return request.param, parts, model, tok


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_match_reference(nvila, n_images):
    name, parts, model, tok = nvila
    images = [_image(84, 56, 0), _image(30, 50, 1)][:n_images]
    rows = ref_rows(parts, images, s2=name != "vila1.5")
    ours = model.encode_images(images)
    if name == "nvila" and n_images == 1:  # 84 x 56 at scales 28/56/84: 4 x 3 blocks of 4 x 4 patches -> 2 x 2
        assert ours[0].shape[0] == 12 * 4
    if name == "vila1.5":  # 35 / 7 = 5 x 5 patches, zero-padded to 6 x 6 -> 3 x 3
        assert all(r.shape[0] == 9 for r in ours)
    ids = [5, 6]
    for f in ours:
        ids += model.placeholder_ids(f, tok) + [7]
    ids = torch.tensor([ids])
    assert ids[0, :].tolist().count(tok.encode("\n", add_special_tokens=False)[0]) >= n_images
    ref = ref_logits(parts, ids, rows)
    torch.testing.assert_close(model.logits(ids, features=ours), ref, rtol=1e-4, atol=1e-4)


def ref_prompt_ids(tok, rows, text):
    """VILA's prompt for one user message, in the tokenizer's chat template: the media tokens straight
    before the text (llava/utils/media.py, extract_media), each image's rows followed by the "\\n" its
    image encoder appends (llava/model/encoders/image/basic.py, end_tokens)."""
    rendered = tok.apply_chat_template([{"role": "user", "content": "<image>" * len(rows) + text}],
                                       add_generation_prompt=True, tokenize=False)
    pieces = rendered.split("<image>")
    img, newline = tok.convert_tokens_to_ids("<image>"), tok.encode("\n", add_special_tokens=False)
    ids = tok.encode(pieces[0], add_special_tokens=False)
    for r, piece in zip(rows, pieces[1:]):
        ids += [img] * r.shape[0] + newline + tok.encode(piece, add_special_tokens=False)
    return ids


@pytest.mark.parametrize("n_images", [1, 2])
def test_greedy_session_matches_reference(nvila, n_images):
    """The session's prompt is VILA's, token for token, and 16 greedy tokens follow the reference's."""
    name, parts, model, tok = nvila
    images = [_image(60, 90, 3), _image(50, 40, 4)][:n_images]
    s = VLMChatSession(model, tok, max_seq_len=512, temperature=0, max_new_tokens=16)
    s.gen.eos_ids = set()
    s.add_images(images)
    res = s.ask("describe")
    rows = ref_rows(parts, images, s2=name != "vila1.5")
    assert_session_follows_reference(s, res, parts, ref_prompt_ids(tok, rows, "describe"), rows)


def assert_session_follows_reference(session, res, parts, prompt_ids, rows):
    """The session cached ``prompt_ids`` as the turn's prompt, and its 16 greedy tokens are the reference's."""
    assert session.gen.cached_ids[:res.stats.prompt_tokens] == prompt_ids
    ids, out = torch.tensor([prompt_ids]), []
    for _ in range(16):
        nxt = int(ref_logits(parts, ids, rows)[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert res.token_ids == out


def test_video_is_one_item_of_its_frames(nvila, tmp_path, monkeypatch):
    """VILA's default video encoder (BasicVideoEncoder): a video is one media item whose rows are its
    frames' one-tile rows, each followed by the "\n" embedding. A clip shorter than a count asked for
    is an error that adds nothing; shorter than the checkpoint's count, it repeats frames, as VILA does."""
    from tinyq.vlm import media

    name, parts, model, tok = nvila
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        _image(40, 30, i).save(frames / f"{i:03d}.png")
    s = VLMChatSession(model, tok, max_seq_len=512, max_new_tokens=2)
    counts = s.add_video(str(frames), 3)
    assert len(counts) == 1 and s.pending_images == 1
    newline = model.llm.model.embed_tokens(torch.tensor(model.newline_ids))
    per_frame = model.encode_images(media.load_video_frames(str(frames), 3))  # one tile each (3 images)
    torch.testing.assert_close(s.images[0], torch.cat([torch.cat([f, newline]) for f in per_frame]))
    ids = s.prompt_ids("what happens?")
    assert ids.count(model.image_token_id) == counts[0]  # the newline rows are the video's own
    with pytest.raises(ValueError, match="has 5 frame\\(s\\), fewer than the 8 asked for"):
        s.add_video(str(frames), 8)
    assert len(s.images) == 1 and s.pending_images == 1  # nothing added
    # the checkpoint's count (8) on a 5-frame clip: VILA repeats frames (uniform_indices(5, 8))
    monkeypatch.setattr(model, "num_video_frames", 8)
    assert media.uniform_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]
    n = s.add_video(str(frames))[0] // 8  # rows per frame
    torch.testing.assert_close(s.images[1][n:2 * n], s.images[1][2 * n:3 * n])  # frame 1, twice
    assert not torch.allclose(s.images[1][:n], s.images[1][n:2 * n])


def _tsp_reference(per_frame, pools, start, end, sep):
    """NVlabs/VILA llava/model/encoders/video/tsp.py, restated: for each pool size, means over groups
    of consecutive frames, rows and columns; each pooled frame between the start and end rows; then
    the sep rows."""
    t, n, c = per_frame.shape
    side = int(n ** 0.5)
    out = []
    for pt, ph, pw in pools:
        grid = per_frame.reshape(t, side, side, c)
        for f in range(0, t, pt):
            pooled = torch.stack([torch.stack([grid[f:f + pt, r:r + ph, q:q + pw].mean(dim=(0, 1, 2))
                                               for q in range(0, side, pw)]) for r in range(0, side, ph)])
            out += [start, pooled.reshape(-1, c), end]
        out.append(sep)
    return torch.cat(out)


def _nvila_with_video_config(path, **root):
    import json

    make_nvila_dir(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, **root)))
    return load_nvila(str(path), precision="fp32", device="cpu", max_seq_len=512)


def _frames_dir(path, n):
    path.mkdir()
    for i in range(n):
        _image(40, 30, i).save(path / f"{i:03d}.png")
    return str(path)


def test_nvila_tsp_video_encoder_pools_frames(tmp_path):
    """An NVILA config with TSPVideoEncoder: the video's rows are VILA's temporal/spatial means of the
    frames, per pool size (rows and columns pooled differently), each pooled frame between the start
    and end embeddings, the separator after each pool size; the count is hand-computed; the
    checkpoint's num_video_frames is the default; frame counts the pools do not divide are refused
    before any frame is decoded."""
    import json

    from tinyq.models.vila_video import video_token_count
    from tinyq.vlm import media

    video = {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[2, 1, 1], [1, 1, 2]],
             "start_tokens": "<|im_start|>", "sep_tokens": "\n\n"}
    model, tok = _nvila_with_video_config(tmp_path / "ckpt", video_encoder=json.dumps(video), num_video_frames=4)
    frames = _frames_dir(tmp_path / "frames", 6)
    s = VLMChatSession(model, tok, max_seq_len=512, max_new_tokens=2)
    # 2 x 2 tokens a frame; start 1 row, end 1, sep 2: 2 x (1 + 4 + 1) + 2, then 4 x (1 + 2 + 1) + 2
    assert s.add_video(frames) == [2 * 6 + 2 + 4 * 4 + 2]
    assert video_token_count(4, 4, model.video_encoder) == s.images[0].shape[0]
    embed = model.llm.model.embed_tokens
    per_frame = torch.stack(model.encode_images(media.load_video_frames(frames, 4)))
    rows = [embed(torch.tensor(tok(text).input_ids)) for text in ("<|im_start|>", "\n", "\n\n")]
    torch.testing.assert_close(s.images[0], _tsp_reference(per_frame, [(2, 1, 1), (1, 1, 2)], *rows))
    with pytest.raises(ValueError, match="averages 2 frames at a time .*multiple of 2 frames, not 3"):
        s.add_video(str(tmp_path / "no-such-video"), 3)  # refused before the (missing) file is read


def test_one_frame_video_on_nvila_is_one_tile(tmp_path):
    """A 1-frame video on an NVILA checkpoint takes the one-tile path (not an image's dynamic S2):
    its rows are the frame's one-tile rows and the "\n" row."""
    model, tok = _nvila_with_video_config(tmp_path / "ckpt")
    frames = _frames_dir(tmp_path / "frames", 2)
    s = VLMChatSession(model, tok, max_seq_len=512)
    s.add_video(frames, 1)
    from tinyq.vlm import media

    frame = media.load_video_frames(frames, 1)[0]
    one_tile = model.encode_images([frame, frame])[0]  # two images: one tile each
    newline = model.llm.model.embed_tokens(torch.tensor(model.newline_ids))
    torch.testing.assert_close(s.images[0], torch.cat([one_tile, newline]))


@pytest.mark.parametrize("root,match", [
    ({"video_encoder": {"_target_": "x.TimeTokenEncoder"}}, "video_encoder 'x.TimeTokenEncoder' is not supported"),
    ({"video_encoder": {"_target_": "llava.model.encoders.BasicVideoEncoder", "sep_tokens": "x"}},
     "BasicVideoEncoder with \\['sep_tokens'\\] is not supported"),
    ({"num_time_tokens": 8}, "time tokens \\(num_time_tokens 8\\) is not supported"),
    ({"video_max_tiles": 4}, "several tiles \\(video_max_tiles 4\\)"),
])
def test_unsupported_video_settings_refuse_video_only(tmp_path, root, match):
    """Video settings tinyq does not reproduce are refused, naming the file and the setting, when a
    video is added; the checkpoint loads and its images still work."""
    model, tok = _nvila_with_video_config(tmp_path / "ckpt", **root)
    s = VLMChatSession(model, tok, max_seq_len=512)
    assert s.add_images([_image(40, 30)])
    with pytest.raises(ValueError, match="config.json: .*" + match):
        s.add_video(_frames_dir(tmp_path / "frames", 2), 2)


def test_pad_aspect_ratio_pads_to_a_mean_colour_square(nvila):
    from tinyq.vlm import media

    name, parts, model, tok = nvila
    if name != "vila1.5":
        pytest.skip("image_aspect_ratio 'pad' is a single-tile (VILA-1.5) option")
    image = _image(50, 20, 4)
    square = media.expand_to_square(image, media.SIGLIP_MEAN)
    plain = model.encode_images([square])[0]
    model.pad_color = media.SIGLIP_MEAN
    try:
        padded = model.encode_images([image])[0]
    finally:
        model.pad_color = None
    torch.testing.assert_close(padded, plain)
    assert not torch.allclose(model.encode_images([image])[0], plain)


def test_awq_llm_folder_loads_like_rtn_at_load(tmp_path):
    """An NVILA whose llm/ is an AutoAWQ-format checkpoint reads as W4A16 and equals RTN at load."""
    import shutil

    from tinyq.nn.w4a16_linear import W4A16Linear
    from tinyq.quant.checkpoint import save_quantized

    fp, awq = tmp_path / "fp", tmp_path / "awq"
    parts = make_nvila_dir(fp)
    shutil.copytree(fp, awq)
    shutil.rmtree(awq / "llm")  # a float model folder is never replaced in place
    save_quantized(parts[2], awq / "llm", 32, tokenizer=parts[3], fmt="awq")
    rtn, tok = load_nvila(str(fp), precision="w4a16", group_size=32, device="cpu")
    ckpt, _ = load_nvila(str(awq), precision="w4a16", device="cpu")
    assert isinstance(ckpt.llm.model.layers[0].mlp.gate_up_proj, W4A16Linear)
    feats = ckpt.encode_images([_image(84, 56)])
    ids = torch.tensor([[5] + ckpt.placeholder_ids(feats[0], tok) + [6]])
    torch.testing.assert_close(ckpt.logits(ids, features=feats), rtn.logits(ids, features=feats), rtol=2e-3, atol=2e-3)


def test_legacy_vila_names_pick_their_conversation_format(tmp_path):
    """VILA-1.5 checkpoints that VILA prompts in a legacy format picked by name (vicuna_v1, llama_3,
    hermes-2) load with that format; NVILA folders keep the tokenizer's chat template. A tokenizer
    without the format's answer-ending token is refused when a session starts."""
    from tinyq.models.nvila import vila_conversation_mode

    assert vila_conversation_mode("/ckpt/VILA1.5-3b") == "vicuna_v1"
    assert vila_conversation_mode("/ckpt/Llama-3-VILA1.5-8B/") == "llama_3"
    assert vila_conversation_mode("/ckpt/VILA1.5-40b-AWQ") == "hermes-2"
    assert vila_conversation_mode("/ckpt/NVILA-8B") is None
    assert vila_conversation_mode("/hub/models--Efficient-Large-Model--VILA1.5-3b/snapshots/0a1b") == "vicuna_v1"
    plain = tmp_path / "NVILA-tiny"
    make_nvila_dir(plain)
    model, _ = load_nvila(str(plain), precision="fp32", device="cpu", max_seq_len=64)
    assert model.conversation is None and model.load_stats["conversation"] == "chat template"
    llama3 = tmp_path / "Llama-3-VILA1.5-8B"
    make_nvila_dir(llama3, projector="mlp_downsample", s2=False, image_size=35)
    model, tok = load_nvila(str(llama3), precision="fp32", device="cpu", max_seq_len=64)
    assert model.conversation.name == "llama_3"
    with pytest.raises(ValueError, match="'<\\|eot_id\\|>', which this tokenizer does not have"):
        VLMChatSession(model, tok)
    # the caller decides over the path: the tokenizer's template, or a named format
    model, _ = load_nvila(str(llama3), precision="fp32", device="cpu", max_seq_len=64, conversation=None)
    assert model.conversation is None and model.load_stats["conversation"] == "chat template"
    model, _ = load_nvila(str(plain), precision="fp32", device="cpu", max_seq_len=64, conversation="hermes-2")
    assert model.conversation.name == "hermes-2"
    with pytest.raises(ValueError, match="conversation='vicuna' is not 'auto', None or one of"):
        load_nvila(str(plain), precision="fp32", device="cpu", conversation="vicuna")


def test_vicuna_v1_session_matches_vila(tmp_path):
    """A VILA1.5-3b-named checkpoint is prompted as VILA prompts it (vicuna_v1, each piece tokenized on
    its own, one BOS at the start; the "\n" after the image embedded as VILA's encoder tokenizes it,
    BOS included), token for token; 16 greedy tokens follow the reference's; answers end at </s>,
    and the next turn closes the last answer with it."""
    path = tmp_path / "VILA1.5-3b"
    parts = make_nvila_dir(path, projector="mlp_downsample", s2=False, image_size=35, llama_bos=True)
    model, tok = load_nvila(str(path), precision="fp32", device="cpu", max_seq_len=512)
    s = VLMChatSession(model, tok, max_seq_len=512, temperature=0, max_new_tokens=16)
    assert tok.convert_tokens_to_ids("</s>") in s.gen.eos_ids
    s.gen.eos_ids = set()
    images = [_image(60, 90, 3)]
    s.add_images(images)
    res = s.ask("describe")
    rows = ref_rows(parts, images, s2=False)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    head, tail = (system + " USER: <image>describe ASSISTANT:").split("<image>")
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    # the image's rows, then what VILA's image encoder appends: tokenizer("\n").input_ids, BOS included
    newline = [tok.bos_token_id] + enc("\n")
    ids = [tok.bos_token_id] + enc(head) + [tok.convert_tokens_to_ids("<image>")] * rows[0].shape[0] + newline
    assert_session_follows_reference(s, res, parts, ids + enc(tail), rows)
    rendered = s._render(s.messages + [{"role": "user", "content": "more"}])
    assert rendered.endswith(f"ASSISTANT: {res.text}</s>USER: more ASSISTANT:")


def test_unsupported_aspect_ratio_mode_is_named(tmp_path):
    """A preprocessing mode tinyq does not reproduce (VILA's InternVL-style "dynamic" tiling) is an
    error naming the file and the value, not a silent single-tile resize."""
    import json

    make_nvila_dir(tmp_path, projector="mlp_downsample", s2=False, image_size=35)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, image_aspect_ratio="dynamic")))
    with pytest.raises(ValueError, match="config.json: image_aspect_ratio 'dynamic' is not supported"):
        load_nvila(str(tmp_path), precision="fp32", device="cpu", max_seq_len=64)


def test_projector_of_the_wrong_shape_names_the_tensor_and_its_file(tmp_path):
    """A projector tensor whose shape the configs do not give is a one-line ValueError naming the tensor
    and mm_projector's file (what examples/chat_vlm.py prints), not load_state_dict's RuntimeError."""
    make_nvila_dir(tmp_path, projector="mlp_downsample", s2=False, image_size=35)
    file = tmp_path / "mm_projector" / "model.safetensors"
    name = "layers.4.weight"  # the last linear, read after every other tensor
    rows, cols = halve_columns(file, name)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(file))}: tensor '{name}' has shape \({rows}, {cols // 2}\), "
                                         rf"expected \({rows}, {cols}\) from the sizes in the configs"):
        load_nvila(str(tmp_path), precision="fp32", device="cpu", max_seq_len=64)


def test_images_added_one_by_one_for_a_message_are_encoded_together(tmp_path):
    """NVILA tiles a lone image with dynamic S2 and gives several one tile each: two images added by
    two calls before one message end up encoded as two added at once, and nothing cached changes."""
    make_nvila_dir(tmp_path)
    model, tok = load_nvila(str(tmp_path), precision="fp32", device="cpu", max_seq_len=512)
    a, b = _image(84, 56, 0), _image(40, 30, 1)
    together = VLMChatSession(model, tok, max_seq_len=512, temperature=0, max_new_tokens=2)
    together.add_images([a, b])
    one_by_one = VLMChatSession(model, tok, max_seq_len=512, temperature=0, max_new_tokens=2)
    assert one_by_one.add_images([a]) == [48]  # alone: dynamic S2 (4 x 3 blocks of 2 x 2)
    one_by_one.add_images([b])
    assert one_by_one.ask("compare").token_ids == together.ask("compare").token_ids
    for mine, theirs in zip(one_by_one.images, together.images):
        torch.testing.assert_close(mine, theirs)
    # an image alone in a later message keeps its dynamic-S2 rows
    one_by_one.add_images([a])
    one_by_one.ask("and now?")
    assert one_by_one.images[-1].shape[0] == 48

