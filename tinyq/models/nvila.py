"""VILA-1.5 and NVILA (NVlabs/VILA layout): SigLIP tower -> downsampling projector -> Qwen2 / Llama.

Sources (NVlabs/VILA at 33b4f1a; sglang python/sglang/srt/models/nvila.py):

- Features: ``hidden_states[mm_vision_select_layer]`` (-2), all tokens for ``cls_patch``
  (VILA llava/model/multimodal_encoder/vision_encoder.py; sglang ``get_image_feature``).
- Projectors (VILA llava/model/multimodal_projector/base_projector.py): ``mlp_downsample`` /
  ``mlp_downsample_2x2_fix``: 2x2 space-to-channel (``flat_square``: zero row/column appended when
  the side is odd; channels ordered [r0c0, r0c1, r1c0, r1c1], tokens row-major), LayerNorm(4C),
  Linear(4C, H), GELU (erf), Linear(H, H). NVILA-Lite ``mlp_downsample_3x3_fix``: 3x3 (zero-padded
  to a multiple of 3), LayerNorm(9C), Linear(9C, 3C), GELU, LayerNorm(3C), Linear(3C, H), GELU,
  Linear(H, H). ``mlp2x_gelu``: Linear, GELU, Linear.
- NVILA dynamic S2 (VILA llava/mm_utils.py ``dynamic_s2_preprocess``; sglang
  ``merge_features_for_dynamic_s2``, ``split_chessboard``, ``merge_chessboard``): one image ->
  tiles of the tower size at scales 448 (1x1) and 896 (2x2), and at the last scale 1344 a grid of
  ``cols x rows`` tiles, ``9 <= cols * rows <= max_tiles (12)``, the ratio closest to the image's
  aspect ratio (ties: the larger grid when the image area exceeds half of it). Per scale the tile
  features are merged back into one map, each map is area-interpolated to the last scale's size
  and the three are concatenated on channels (3 x 1152 = 3456); the map is cut again into
  ``rows x cols`` blocks of 32 x 32, each block goes through the projector (2x2: 256 tokens) and
  the outputs are merged back into one ``(16 rows) x (16 cols)`` grid, flattened row-major.
- Several images in one message (VILA llava/model/llava_arch.py ``generate_content``: dynamic S2
  only when there is exactly one image): each is resized to one tile and its features repeated
  x3 on channels (sglang: ``block_size is None``). A video's frames are encoded so too, then
  arranged (NVILA: pooled) by the checkpoint's video encoder as one media item
  (:mod:`tinyq.models.vila_video`).
- After each image's rows comes the embedding of ``"\\n"`` (VILA
  llava/model/encoders/image/basic.py ``BasicImageEncoder(end_tokens="\\n")``).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tinyq.models.loader import TensorSource, build_model, checked_tensors, load_tokenizer, peak_host_memory_mb
from tinyq.models.vision import LayerNorm, VisionConfig, VisionTower, load_vision_tower
from tinyq.models.vlm import IMAGE_MARKER, VisionLanguageModel
from tinyq.models.vila_video import VideoEncoder
from tinyq.nn.dense_linear import DenseLinear
from tinyq.vlm import media
from tinyq.vlm.conversation import LEGACY_FORMATS

# ChatML as VILA writes it for Qwen2 LLMs (NVlabs/VILA llava/model/language_model/chat_templates/qwen2.jinja),
# for tokenizers without a chat template.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------- dynamic-S2 tiling


def s2_grid(width: int, height: int, scales: Sequence[int], max_tiles: int) -> Tuple[int, int]:
    """``(cols, rows)`` of tiles at the last scale for an image of ``width x height``."""
    min_tiles = (scales[-1] // scales[0]) ** 2
    # VILA (llava/mm_utils.py, dynamic_s2_preprocess) gathers the grids in a Python set and sorts them
    # by area alone, so grids of one area keep the set's iteration order, which can depend on the
    # order of insertion; the grids go in in that order here too, so that an aspect ratio exactly
    # halfway between two grids of one area picks the grid VILA picks.
    grids = set()
    for n in range(min_tiles, max_tiles + 1):
        for c in range(1, n + 1):
            for r in range(1, n + 1):
                if min_tiles <= c * r <= max_tiles:
                    grids.add((c, r))
    ratios = sorted(grids, key=lambda cr: cr[0] * cr[1])
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for c, r in ratios:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * scales[0] ** 2 * c * r:
            best = (c, r)
    return best


def s2_tiles(image, scales: Sequence[int], max_tiles: int):
    """``(tiles, (rows, cols))``: the PIL tiles of every scale, row-major per scale, and the last
    scale's grid. Tiles are ``scales[0]`` square; resizes are bicubic (PIL's default for RGB)."""
    from PIL import Image

    tile = scales[0]
    grids = [(s // tile, s // tile) for s in scales[:-1]] + [s2_grid(*image.size, scales, max_tiles)]
    tiles = []
    for cols, rows in grids:
        resized = image.resize((cols * tile, rows * tile), Image.BICUBIC)
        tiles += [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
                  for r in range(rows) for c in range(cols)]
    cols, rows = grids[-1]
    return tiles, (rows, cols)


def merge_tiles(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[rows * cols, C, h, w]`` (row-major tiles) -> ``[C, rows * h, cols * w]``."""
    n, c, h, w = x.shape
    return x.view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def split_tiles(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[C, rows * h, cols * w]`` -> ``[rows * cols, C, h, w]`` (inverse of :func:`merge_tiles`)."""
    c, hh, ww = x.shape
    h, w = hh // rows, ww // cols
    return x.view(c, rows, h, cols, w).permute(1, 3, 0, 2, 4).reshape(rows * cols, c, h, w)


# ---------------------------------------------------------------- projectors


class SpaceToChannel(nn.Module):
    """``[B, g*g, C]`` -> ``[B, ceil(g/k)^2, k*k*C]``: each k x k patch block (zero-padded at the
    bottom/right) becomes one token, channels ordered row by row within the block."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        b, n, c = x.shape
        g, k = math.isqrt(n), self.k
        if g * g != n:
            raise ValueError(f"space-to-channel needs a square token grid, got {n} tokens")
        x = x.view(b, g, g, c)
        pad = -g % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        s = (g + pad) // k
        return x.view(b, s, k, s, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, s * s, k * k * c)


class GELU(nn.Module):
    def forward(self, x):
        return F.gelu(x)


def build_projector(kind: str, mm_hidden: int, hidden: int) -> Tuple[nn.Sequential, int]:
    """``(layers, downsample factor)`` with VILA's ``nn.Sequential`` indices, so checkpoint names
    ``layers.N.*`` load as they are."""
    ln = lambda d: LayerNorm(d, 1e-5)  # noqa: E731  (torch.nn.LayerNorm's default eps)
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        c = 4 * mm_hidden
        return nn.Sequential(SpaceToChannel(2), ln(c), DenseLinear(c, hidden), GELU(), DenseLinear(hidden, hidden)), 2
    if kind == "mlp_downsample_3x3_fix":
        c = 9 * mm_hidden
        return nn.Sequential(SpaceToChannel(3), ln(c), DenseLinear(c, 3 * mm_hidden), GELU(), ln(3 * mm_hidden),
                             DenseLinear(3 * mm_hidden, hidden), GELU(), DenseLinear(hidden, hidden)), 3
    if kind == "mlp2x_gelu":
        return nn.Sequential(DenseLinear(mm_hidden, hidden), GELU(), DenseLinear(hidden, hidden)), 1
    raise ValueError(f"unsupported mm_projector_type {kind!r}; supported: mlp_downsample(_2x2_fix), "
                     "mlp_downsample_3x3_fix, mlp2x_gelu")


# ---------------------------------------------------------------- the model


class NvilaModel(VisionLanguageModel):
    """VILA-1.5 (``s2_scales=None``) or NVILA (dynamic S2 over ``s2_scales``)."""

    chat_template = CHATML_TEMPLATE
    # VILA puts the media token straight before the text (NVlabs/VILA llava/utils/media.py, extract_media)
    # and its image encoder appends the "\n" embedding (llava/model/encoders/image/basic.py, end_tokens)
    image_text_separator = ""

    def __init__(self, tower: VisionTower, projector: nn.Sequential, llm, image_token_id: int,
                 newline_ids: List[int], s2_scales: Optional[List[int]] = None, max_tiles: int = 12,
                 select_layer: int = -2, select_feature: str = "cls_patch", processor=None, pad: bool = False,
                 video_encoder: Optional[VideoEncoder] = None, num_video_frames: int = 8,
                 video_unsupported: Optional[str] = None):
        super().__init__()
        self.vision_tower, self.mm_projector, self.llm = tower, projector, llm
        self.image_token_id, self.newline_ids = int(image_token_id), list(newline_ids)
        self.s2_scales, self.max_tiles = s2_scales, max_tiles
        self.select_layer, self.select_feature = select_layer, select_feature
        if s2_scales is not None and s2_scales[0] != tower.config.image_size:
            raise ValueError(f"s2_scales[0] {s2_scales[0]} must equal the tower's image_size {tower.config.image_size}")
        self.processor = processor or media.image_processor(tower.config.kind, tower.config.image_size)
        # image_aspect_ratio "pad": square of the processor's mean colour first (VILA llava/mm_utils.py process_image)
        self.pad_color = tuple(getattr(self.processor, "image_mean", None) or media.SIGLIP_MEAN) if pad else None
        # VILA's default video encoder: each frame's rows, then the "\n" its image encoder appends too
        self.video_encoder = video_encoder or VideoEncoder(((1, 1, 1),), end_ids=tuple(self.newline_ids))
        self.num_video_frames = num_video_frames  # the checkpoint's frame count (VILA samples exactly that many)
        self.video_unsupported = video_unsupported  # why this checkpoint's video input is refused, if it is

    def placeholder_ids(self, features, tokenizer) -> List[int]:
        return [self.image_token_id] * features.shape[0] + self.newline_ids

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        strategy = "default" if self.select_feature == "patch" else "full"
        return self.vision_tower.encode(pixels, self.select_layer, strategy)  # [N, g*g, C]

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> List[torch.Tensor]:
        images = [media.load_image(im) for im in images]
        if not images:
            return []
        if self.s2_scales is not None and len(images) == 1:
            return [self._encode_s2(images[0])]
        return self._encode_one_tile_each(images)

    @torch.inference_mode()
    def encode_video(self, frames: Sequence) -> torch.Tensor:
        """A video's rows ``[R, H]``, one media item: its frames encoded one tile each, then
        arranged (and, for NVILA, pooled) by the checkpoint's video encoder
        (:mod:`tinyq.models.vila_video`)."""
        if self.video_unsupported:
            raise ValueError(self.video_unsupported)
        frames = [media.load_image(im) for im in frames]
        if not frames:
            raise ValueError("encode_video: no frames given")
        per_frame = torch.stack(self._encode_one_tile_each(frames))  # [T, S, H]
        return self.video_encoder.rows(per_frame, self.llm.model.embed_tokens)

    def _encode_one_tile_each(self, images) -> List[torch.Tensor]:
        """Several images (or a video's frames): one tile each, as VILA encodes them without block sizes."""
        if self.pad_color is not None:
            images = [media.expand_to_square(im, self.pad_color) for im in images]
        feats = self._features(media.pixel_values(self.processor, images))  # [N, g*g, C]
        if self.s2_scales is not None:
            feats = feats.repeat(1, 1, len(self.s2_scales))  # every scale sees the same one tile
        return list(self.mm_projector(feats).to(self.dtype))

    def _encode_s2(self, image) -> torch.Tensor:
        tiles, (rows, cols) = s2_tiles(image, self.s2_scales, self.max_tiles)
        return self.encode_s2_pixels(media.pixel_values(self.processor, tiles), rows, cols)

    @torch.inference_mode()
    def encode_s2_pixels(self, pixels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image's dynamic-S2 rows ``[rows*g' * cols*g', H]`` from its tiles' pixels
        ``[tiles, 3, S, S]`` (all scales, row-major per scale, as :func:`s2_tiles` orders them)."""
        blocks = s2_blocks(self._features(pixels), rows, cols, self.s2_scales)  # [rows*cols, g*g, 3C]
        return s2_unblock(self.mm_projector(blocks), rows, cols).to(self.dtype)


def s2_blocks(feats: torch.Tensor, rows: int, cols: int, scales: Sequence[int]) -> torch.Tensor:
    """Tile features of all scales ``[tiles, g*g, C]`` -> the projector's input blocks
    ``[rows*cols, g*g, len(scales) x C]``: per-scale maps merged, area-resized to the last scale's
    ``rows*g x cols*g``, concatenated on channels and cut into ``rows x cols`` blocks."""
    g = math.isqrt(feats.shape[1])
    maps = feats.transpose(1, 2).reshape(feats.shape[0], -1, g, g)  # [tiles, C, g, g]
    per_scale, start = [], 0
    for r, c in [(s // scales[0],) * 2 for s in scales[:-1]] + [(rows, cols)]:
        per_scale.append(merge_tiles(maps[start:start + r * c], r, c))
        start += r * c
    if start != feats.shape[0]:
        raise ValueError(f"{feats.shape[0]} tiles do not make scales {list(scales)} with a {rows} x {cols} last grid")
    size = per_scale[-1].shape[-2:]
    merged = torch.cat([F.interpolate(m[None].float(), size=size, mode="area")[0].to(m.dtype)
                        for m in per_scale])  # [3C, rows*g, cols*g]
    return split_tiles(merged, rows, cols).flatten(2).transpose(1, 2)


def s2_unblock(out: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Projector output per block ``[rows*cols, g'^2, H]`` -> the image's rows ``[rows*g' * cols*g', H]``,
    row-major over the whole image."""
    gp = math.isqrt(out.shape[1])
    grid = merge_tiles(out.transpose(1, 2).reshape(rows * cols, -1, gp, gp), rows, cols)  # [H, rows*g', cols*g']
    return grid.flatten(1).t()


def s2_token_count(width: int, height: int, scales: Sequence[int], max_tiles: int, grid: int, k: int) -> int:
    """Image rows NVILA makes of a ``width x height`` image (``grid`` patches per tile side, ``k x k``
    downsample): ``rows * cols * ceil(grid / k)^2``."""
    cols, rows = s2_grid(width, height, scales, max_tiles)
    return rows * cols * (-(-grid // k)) ** 2


def _read_json(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a VILA/NVILA checkpoint has llm/, vision_tower/ and "
                                "mm_projector/ folders, each with a config.json")
    with open(path) as f:
        return json.load(f)


# VILA picks a legacy conversation format (tinyq.vlm.conversation) when these names occur in a checkpoint's
# path (NVlabs/VILA llava/conversation.py, CONVERSATION_MODE_MAPPING, first match wins); otherwise the
# tokenizer's chat template.
VILA_CONVERSATION_MODES = (("vila1.5-3b", "vicuna_v1"), ("vila1.5-8b", "llama_3"), ("vila1.5-13b", "vicuna_v1"),
                           ("vila1.5-40b", "hermes-2"), ("llama-3", "llama_3"), ("llama3", "llama_3"))


def vila_conversation_mode(path: str) -> Optional[str]:
    """The legacy conversation format VILA would pick for the checkpoint at ``path``, or None. VILA
    matches the whole path (a hub cache's ``models--Org--VILA1.5-3b/snapshots/<sha>`` included)."""
    name = os.path.normpath(path).lower()
    return next((mode for key, mode in VILA_CONVERSATION_MODES if key in name), None)


# image_aspect_ratio values whose preprocessing tinyq reproduces: the processor's own resize (None,
# "resize"), a mean-colour square first ("pad"), NVILA's dynamic S2 tiling ("dynamic_s2")
ASPECT_MODES = (None, "resize", "pad", "dynamic_s2")


def load_nvila(path: str, precision: str = "w4a16", group_size: int = 64, device=None,
               max_seq_len: int = 8192, dtype: Optional[torch.dtype] = None, conversation: Optional[str] = "auto"):
    """Load a VILA-1.5 / NVILA directory (``config.json`` + ``llm/``, ``vision_tower/``,
    ``mm_projector/``) -> ``(NvilaModel, tokenizer)``. ``precision`` applies to the LLM.
    ``conversation``: ``"auto"`` picks a legacy format by the checkpoint's path as VILA does
    (:func:`vila_conversation_mode`), a format name forces one (:data:`LEGACY_FORMATS`), None keeps the
    tokenizer's chat template."""
    if conversation not in (None, "auto", *LEGACY_FORMATS):
        raise ValueError(f"conversation={conversation!r} is not 'auto', None or one of {sorted(LEGACY_FORMATS)}")
    t0 = time.perf_counter()
    root = _read_json(path)
    llm_dir, tower_dir, proj_dir = (os.path.join(path, d) for d in ("llm", "vision_tower", "mm_projector"))
    llm_cfg, tower_cfg, proj_cfg = _read_json(llm_dir), _read_json(tower_dir), _read_json(proj_dir)
    llm = build_model(llm_cfg, TensorSource(folder=llm_dir), precision, group_size, device, dtype, max_seq_len)
    vcfg = VisionConfig.from_hf(tower_cfg)
    tower = load_vision_tower(vcfg, TensorSource(folder=tower_dir), "", llm.dtype, llm.device)
    s2 = None
    aspect = root.get("image_aspect_ratio")
    if aspect not in ASPECT_MODES:
        raise ValueError(f"{os.path.join(path, 'config.json')}: image_aspect_ratio {aspect!r} is not supported; tinyq "
                         f"reads {', '.join(repr(m) for m in ASPECT_MODES)}")
    if aspect == "dynamic_s2":
        scales = root.get("s2_scales", "448,896,1344")
        s2 = [int(s) for s in (scales.split(",") if isinstance(scales, str) else scales)]
    mm_hidden = vcfg.hidden_size * (len(s2) if s2 else 1)
    projector, _ = build_projector(proj_cfg.get("mm_projector_type", ""), mm_hidden, llm.config.hidden_size)
    proj_src = TensorSource(folder=proj_dir)
    stored = lambda name: name if name in proj_src else "layers." + name  # noqa: E731 (VILA's `layers.N.*`)
    projector.load_state_dict(
        checked_tensors(projector, proj_src, stored, "the configs (llm/, vision_tower/, mm_projector/)"), strict=True)
    projector.to(llm.device, llm.dtype).requires_grad_(False)
    tokenizer = load_tokenizer(llm_dir)
    model = NvilaModel(
        # the "\n" VILA's image encoder appends: tokenizer(end_tokens).input_ids, special tokens included
        # (llava/model/encoders/image/basic.py, embed_tokens): a BOS too where the tokenizer adds one
        tower, projector, llm, _image_token_id(tokenizer, root), list(tokenizer("\n").input_ids),
        s2_scales=s2, max_tiles=int(root.get("max_tiles", 12)),
        select_layer=int(root.get("mm_vision_select_layer", -2)),
        select_feature=root.get("mm_vision_select_feature", "cls_patch"),
        processor=media.image_processor(vcfg.kind, vcfg.image_size, tower_dir),
        pad=aspect == "pad", **_video_settings(root, tokenizer, os.path.join(path, "config.json")),
    ).eval()
    # VILA-1.5 checkpoints that VILA prompts in a legacy format chosen by name are prompted the same way
    mode = vila_conversation_mode(path) if conversation == "auto" else conversation
    model.conversation = LEGACY_FORMATS[mode] if mode is not None else None
    model.load_stats = {"seconds": time.perf_counter() - t0, "peak_host_mb": peak_host_memory_mb(), "path": path,
                        "conversation": mode or "chat template"}
    return model, tokenizer


def _video_settings(root: dict, tokenizer, where: str) -> dict:
    """NvilaModel's video arguments from the root config. A video input tinyq does not reproduce (an
    encoder other than VILA's Basic / TSP, time tokens, several tiles a frame) is refused when a video
    is added, not at load: the checkpoint's images still work."""
    out = {"num_video_frames": int(root.get("num_video_frames") or 8)}
    try:
        out["video_encoder"] = VideoEncoder.from_config(root.get("video_encoder"), tokenizer)
    except ValueError as exc:
        out["video_unsupported"] = f"{where}: {exc}"
    if root.get("num_time_tokens"):
        out["video_unsupported"] = (f"{where}: video with time tokens (num_time_tokens "
                                    f"{root['num_time_tokens']}) is not supported")
    if int(root.get("video_max_tiles") or 1) > 1:
        out["video_unsupported"] = (f"{where}: video frames of several tiles (video_max_tiles "
                                    f"{root['video_max_tiles']}) are not supported")
    return out


def _image_token_id(tokenizer, root: dict) -> int:
    """The tokenizer's ``<image>`` token, else the config's, else the pad token (the session splices
    by position, so the id only has to be one the prompt text never produces)."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    if tid is not None and tid != tokenizer.unk_token_id:
        return tid
    return int(root.get("image_token_id") or tokenizer.pad_token_id or 0)
