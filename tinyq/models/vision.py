"""Vision towers of VLMs: CLIP ViT (LLaVA-1.5) and SigLIP (LLaVA with SigLIP, VILA-1.5, NVILA).

One encoder, two flavours (``VisionConfig.kind``)::

    pixels [B, 3, S, S] -> patch conv (P x P, stride P) -> [B, N, C]      N = (S / P)^2 patches
      clip:   [CLS | patches] + pos (N + 1 rows) -> pre_layrnorm         (transformers CLIPVisionModel)
      siglip: patches + pos (N rows), patch conv has a bias              (transformers SiglipVisionModel)
    layer:  h += out_proj(attn(qkv_proj(LN1(h))));  h += fc2(act(fc1(LN2(h))))
      act: clip quick_gelu x * sigmoid(1.702 x); siglip gelu (tanh approximation)
    siglip: last_hidden_state = post_layernorm(h)

``hidden_states[0]`` is the encoder input, ``hidden_states[i]`` the output of layer ``i``, as in
transformers; VLMs take ``hidden_states[-2]`` (``vision_feature_layer``), so :meth:`VisionTower.
features` runs only the layers it needs (26 of SigLIP so400m's 27). Attention is
:func:`tinyq.ops.flash_attention` (non-causal, no RoPE), the norms :func:`tinyq.ops.layer_norm.
add_layer_norm` (residual add fused into the second norm of each layer); q/k/v are fused into one
linear at load time. GELU stays torch's one-pass kernel: only fusing it into the fc1 GEMM epilogue
would save its read + write, and the tower's GEMMs are cuBLAS.

VLMs call :meth:`VisionTower.encode`: on a CUDA device it replays CUDA graphs of
:meth:`VisionTower.features` in chunks of 8, 4, 2, 1 tiles (:class:`tinyq.graphs.BatchGraphs`). One
tile's eager forward is ~250 kernel launches, so without graphs an image would cost Python time,
not GPU time. Graphs are dropped when the tower moves or its linears are swapped
(:meth:`VisionTower.drop_graphs`), and not used while ``use_graphs`` is False (calibration hooks).

Checkpoint names are HF's (``vision_model.encoder.layers.N.self_attn.{q,k,v,out}_proj``,
``layer_norm1/2``, ``mlp.fc1/fc2``, ``embeddings.{patch,position}_embedding``, CLIP's
``pre_layrnorm`` and ``embeddings.class_embedding``), with or without the ``vision_model.`` prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from tinyq.graphs import BatchGraphs
from tinyq.nn.dense_linear import DenseLinear
from tinyq.ops.attention import flash_attention
from tinyq.ops.layer_norm import add_layer_norm, layer_norm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
KINDS = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}


@dataclass
class VisionConfig:
    kind: str  # "clip" | "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    num_channels: int = 3

    @classmethod
    def from_hf(cls, hf: dict) -> "VisionConfig":
        """From a CLIP/SigLIP vision ``config.json`` dict (or a full CLIP/SigLIP one with ``vision_config``)."""
        if "vision_config" in hf and "hidden_size" not in hf:
            hf = dict(hf["vision_config"], model_type=hf.get("model_type", ""))
        kind = KINDS.get(hf.get("model_type", ""))
        if kind is None:
            archs = " ".join(hf.get("architectures") or [])
            kind = "siglip" if "Siglip" in archs else "clip" if "CLIP" in archs else None
        if kind is None:
            raise ValueError(f"unsupported vision tower {hf.get('model_type')!r}; supported: CLIP and SigLIP")
        act = hf.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {act!r}; supported: {sorted(ACTIVATIONS)}")
        return cls(
            kind=kind, hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
            image_size=int(hf["image_size"]), patch_size=int(hf["patch_size"]),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)),
            hidden_act=act, num_channels=int(hf.get("num_channels", 3)),
        )

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid ** 2 + (1 if self.kind == "clip" else 0)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        """Without ``residual``: the norm of ``x``. With it: ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, c // cfg.num_heads
        self.layer_norm1 = LayerNorm(c, cfg.layer_norm_eps)
        self.qkv_proj = DenseLinear(c, 3 * c)
        self.out_proj = DenseLinear(c, c)
        self.layer_norm2 = LayerNorm(c, cfg.layer_norm_eps)
        self.fc1 = DenseLinear(c, cfg.intermediate_size)
        self.fc2 = DenseLinear(cfg.intermediate_size, c)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, h):
        b, n, c = h.shape
        qkv = self.qkv_proj(self.layer_norm1(h)).view(b, n, 3, self.heads, self.head_dim)  # [B, N, 3, heads, D]
        attn = flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=False)  # [B, N, heads, D]
        x, h = self.layer_norm2(self.out_proj(attn.reshape(b, n, c)), h)
        return h + self.fc2(self.act(self.fc1(x)))


class VisionTower(nn.Module):
    """CLIP / SigLIP vision encoder; parameter names follow transformers' minus ``vision_model.``
    and with ``self_attn.{q,k,v}_proj`` fused into ``qkv_proj``. Build on ``meta`` and load with
    :func:`load_vision_tower`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        c = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, cfg.patch_size, cfg.patch_size,
                                         bias=cfg.kind == "siglip")
        self.position_embedding = nn.Parameter(torch.zeros(cfg.num_positions, c))
        if cfg.kind == "clip":
            self.class_embedding = nn.Parameter(torch.zeros(c))
            self.pre_layrnorm = LayerNorm(c, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.kind == "siglip":
            self.post_layernorm = LayerNorm(c, cfg.layer_norm_eps)
        self.use_graphs = True  # encode() replays CUDA graphs on a CUDA device
        self._graphs: Dict[tuple, BatchGraphs] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.position_embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.position_embedding.device

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> encoder input ``[B, N (+1 CLS), C]`` (``hidden_states[0]``)."""
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [B, {', '.join(map(str, want))}], got {tuple(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.device, self.dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        if cfg.kind == "clip":
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.position_embedding
        return self.pre_layrnorm(x) if cfg.kind == "clip" else x

    def __getstate__(self):  # copies and pickles leave the graphs behind (they cannot be copied)
        state = super().__getstate__()
        return dict(state, _graphs={})

    def drop_graphs(self) -> None:
        """Forget captured graphs (they hold the kernels and weights of the moment of capture)."""
        self._graphs = {}

    def _apply(self, fn, *args, **kwargs):
        self.drop_graphs()
        return super()._apply(fn, *args, **kwargs)

    def encode(self, pixel_values: torch.Tensor, layer: Union[int, Sequence[int]] = -2,
               strategy: str = "default") -> torch.Tensor:
        """:meth:`features`, through CUDA graphs on a CUDA device (see the module docstring)."""
        if not (self.use_graphs and self.device.type == "cuda"):
            return self.features(pixel_values, layer, strategy)
        key = (layer if isinstance(layer, int) else tuple(layer), strategy)
        graphs = self._graphs.get(key)
        if graphs is None:  # bad arguments raise in the eager warm-up before the capture
            graphs = self._graphs[key] = BatchGraphs(lambda px: self.features(px, layer, strategy))
        return graphs(pixel_values.to(self.device, self.dtype))

    @property
    def capture_s(self) -> float:
        """Seconds spent capturing tower graphs so far (their eager warm-up runs included)."""
        return sum(g.capture_s for g in self._graphs.values())

    @property
    def graph_count(self) -> int:
        return sum(len(g.graphs) for g in self._graphs.values())

    def hidden_states(self, pixel_values: torch.Tensor, upto: int = None) -> List[torch.Tensor]:
        """``[hidden_states[0], ..., hidden_states[upto]]`` (default: all layers)."""
        upto = self.config.num_layers if upto is None else upto
        hs = [self.embed(pixel_values)]
        for layer in self.layers[:upto]:
            hs.append(layer(hs[-1]))
        return hs

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model output (SigLIP: after ``post_layernorm``; CLIP: the last layer's output)."""
        h = self.features(pixel_values, -1, "full")  # the last layer's output, nothing else kept
        return self.post_layernorm(h) if self.config.kind == "siglip" else h

    def features(self, pixel_values: torch.Tensor, layer: Union[int, Sequence[int]] = -2,
                 strategy: str = "default") -> torch.Tensor:
        """Image features as LLaVA selects them: ``hidden_states[layer]`` (a list: concatenated on
        channels), without the first token for ``strategy="default"`` (CLIP's CLS), all for ``"full"``.
        Returns ``[B, tokens, C x len(layers)]``; only layers up to the deepest one asked run."""
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        layers = [layer] if isinstance(layer, int) else list(layer)
        n = self.config.num_layers + 1
        if not layers or any(not -n <= i < n for i in layers):
            raise ValueError(f"vision_feature_layer {layer!r} out of range for {n} hidden states")
        idx = [i % n for i in layers]
        kept = {}  # only the asked layers stay alive (all 27 of so400m at 8 tiles would be 0.5 GB)
        h = self.embed(pixel_values)
        for i in range(max(idx) + 1):
            if i:
                h = self.layers[i - 1](h)
            if i in idx:
                kept[i] = h
        picked = [kept[i][:, 1:] if strategy == "default" else kept[i] for i in idx]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


def vision_state_dict(cfg: VisionConfig, source, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Read a tower's tensors from ``source`` (``__contains__`` / ``get``) under ``prefix`` (with or
    without ``vision_model.``), renamed and fused for :class:`VisionTower`."""
    if prefix + "vision_model.embeddings.patch_embedding.weight" in source:
        prefix += "vision_model."
    if prefix + "embeddings.patch_embedding.weight" not in source:
        raise ValueError(f"no vision tower under {prefix!r}: missing {prefix}embeddings.patch_embedding.weight")
    get = lambda name: source.get(prefix + name)  # noqa: E731
    sd = {"patch_embedding.weight": get("embeddings.patch_embedding.weight"),
          "position_embedding": get("embeddings.position_embedding.weight")}
    if cfg.kind == "siglip":
        sd["patch_embedding.bias"] = get("embeddings.patch_embedding.bias")
        norms = {"post_layernorm": "post_layernorm"}
    else:
        sd["class_embedding"] = get("embeddings.class_embedding")
        norms = {"pre_layrnorm": "pre_layrnorm"}
    for i in range(cfg.num_layers):
        p, q = f"encoder.layers.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            sd[q + "qkv_proj." + part] = torch.cat([get(f"{p}self_attn.{x}_proj.{part}") for x in "qkv"])
            sd[q + "out_proj." + part] = get(f"{p}self_attn.out_proj.{part}")
            for mod in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                sd[q + mod.replace("mlp.", "") + "." + part] = get(p + mod + "." + part)
    for ours, theirs in norms.items():
        for part in ("weight", "bias"):
            sd[f"{ours}.{part}"] = get(f"{theirs}.{part}")
    return sd


def load_vision_tower(cfg: VisionConfig, source, prefix: str = "", dtype=torch.float16, device="cpu") -> VisionTower:
    """Build a :class:`VisionTower` on ``meta`` and assign its weights from ``source``."""
    with torch.device("meta"):
        tower = VisionTower(cfg)
    sd = vision_state_dict(cfg, source, prefix)
    expected = tower.state_dict()
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"vision tensor {prefix}{name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(expected[name].shape)}")
    tower.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return tower.eval().requires_grad_(False)
