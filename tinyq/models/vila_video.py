"""VILA's video encoders: how a VILA/NVILA checkpoint turns a video's frames into LLM rows.

A video is one media item. Its frames are encoded as images (one tile each: the several-images
path, NVlabs/VILA ``llava/model/llava_arch.py`` ``encode_images`` without block sizes), giving
``[T, S, C]`` rows after the projector (``S = L x L`` tokens per frame). Then, per the checkpoint's
``video_encoder`` config (``llava/model/encoders/video/``):

- ``BasicVideoEncoder``: each frame's rows, then the embedding of ``end_tokens`` ("\\n" by default),
  ``start_tokens`` before it if set; all frames in order.
- ``TSPVideoEncoder`` (NVILA): for each ``(pt, ph, pw)`` in ``pool_sizes``, the frames are averaged
  over groups of ``pt`` consecutive frames and ``ph x pw`` neighbouring tokens (``pool`` in
  ``tsp.py``: a mean over each group of consecutive indices along time, then rows, then columns),
  each pooled frame framed by the start/end tokens as above, then ``sep_tokens`` once; the pool
  sizes' results are concatenated. Basic is TSP with one pool size ``(1, 1, 1)`` and no separator.

Token strings are embedded as VILA embeds them: ``tokenizer(text).input_ids`` (special tokens
included) through the LLM's embedding table. The checkpoint's ``num_video_frames`` is the default
frame count (:class:`tinyq.vlm.session.VLMChatSession.add_video`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

BASIC, TSP = "BasicVideoEncoder", "TSPVideoEncoder"


@dataclass(frozen=True)
class VideoEncoder:
    """``pool_sizes`` ``((pt, ph, pw), ...)``; token ids of the strings that frame each (pooled)
    frame and follow each pool size's block (empty: none)."""

    pool_sizes: Tuple[Tuple[int, int, int], ...]
    start_ids: Tuple[int, ...] = ()
    end_ids: Tuple[int, ...] = ()
    sep_ids: Tuple[int, ...] = ()

    @classmethod
    def from_config(cls, value, tokenizer) -> "VideoEncoder":
        """From a checkpoint's ``video_encoder`` (a dict or its JSON string; absent: VILA's default,
        ``BasicVideoEncoder``). Other encoders, and keys these two do not take, are refused by name."""
        cfg = json.loads(value) if isinstance(value, str) else dict(value or {"_target_": BASIC})
        target = str(cfg.get("_target_", "")).rsplit(".", 1)[-1]
        if target not in (BASIC, TSP):
            raise ValueError(f"video_encoder {cfg.get('_target_')!r} is not supported; tinyq reads {BASIC} and {TSP}")
        keys = {"_target_", "start_tokens", "end_tokens"} | ({"pool_sizes", "sep_tokens"} if target == TSP else set())
        if set(cfg) - keys:
            raise ValueError(f"video_encoder {target} with {sorted(set(cfg) - keys)} is not supported; it takes "
                             f"{sorted(keys)}")
        pools = ((1, 1, 1),) if target == BASIC else tuple(tuple(int(v) for v in p) for p in cfg.get("pool_sizes", ()))
        if not pools or any(len(p) != 3 or min(p) < 1 for p in pools):
            raise ValueError(f"video_encoder pool_sizes must be (time, height, width) triples of positive sizes, "
                             f"got {cfg.get('pool_sizes')!r}")

        def ids(key, default=None):
            text = cfg.get(key, default)
            return tuple(tokenizer(text).input_ids) if text is not None else ()

        return cls(pools, ids("start_tokens"), ids("end_tokens", "\n"), ids("sep_tokens"))

    def check_frames(self, frames: int) -> None:
        """Raise ValueError unless every pool size's time window divides ``frames`` (before any is decoded)."""
        for pool in self.pool_sizes:
            if frames % pool[0]:
                raise ValueError(f"the video encoder averages {pool[0]} frames at a time (pool size {pool}): ask "
                                 f"for a multiple of {pool[0]} frames, not {frames}")

    def rows(self, frames: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A video's rows ``[R, C]`` from its frames' rows ``frames [T, S, C]``; ``embed`` maps token
        ids to LLM embeddings. Raises ValueError when a pool size does not divide the frames or the
        token grid (``S`` must be a square grid where a pool size spans tokens)."""
        t, s, c = frames.shape
        self.check_frames(t)
        side = math.isqrt(s)
        spatial = any(ph > 1 or pw > 1 for _, ph, pw in self.pool_sizes)
        if spatial and side * side != s:
            raise ValueError(f"the video encoder pools tokens in space, but a frame's {s} tokens are no square grid")
        extra = {name: embed(torch.tensor(ids, dtype=torch.long, device=frames.device)).to(frames.dtype)
                 for name, ids in (("start", self.start_ids), ("end", self.end_ids), ("sep", self.sep_ids))}
        out = []
        for pool in self.pool_sizes:
            if spatial:
                if side % pool[1] or side % pool[2]:
                    raise ValueError(f"the video encoder pools {pool[1]} x {pool[2]} tokens (pool size {pool}), "
                                     f"which does not divide a frame's {side} x {side} token grid")
                grid = pool_mean(frames.reshape(t, side, side, c), pool).flatten(1, 2)  # [t', l'^2, C]
            else:
                grid = pool_mean(frames, pool[:1])
            for frame in grid:
                out += [extra["start"], frame, extra["end"]]
            out.append(extra["sep"])
        return torch.cat(out)


def pool_mean(x: torch.Tensor, sizes) -> torch.Tensor:
    """Mean over groups of ``sizes[d]`` consecutive indices along each leading dim ``d`` of ``x``,
    one dim after the other in ``x``'s dtype (so rounded after each, as VILA's ``pool``)."""
    for dim, size in enumerate(sizes):
        x = x.reshape(x.shape[:dim] + (-1, size) + x.shape[dim + 1:]).mean(dim + 1)
    return x


def video_token_count(frames: int, tokens_per_frame: int, encoder: VideoEncoder) -> int:
    """Rows :meth:`VideoEncoder.rows` makes of ``frames`` frames of ``tokens_per_frame`` tokens."""
    side = math.isqrt(tokens_per_frame)
    framing = len(encoder.start_ids) + len(encoder.end_ids)
    per_frame = [tokens_per_frame if (ph, pw) == (1, 1) else (side // ph) * (side // pw)
                 for _, ph, pw in encoder.pool_sizes]
    return sum((frames // pool[0]) * (n + framing) + len(encoder.sep_ids)
               for pool, n in zip(encoder.pool_sizes, per_frame))
