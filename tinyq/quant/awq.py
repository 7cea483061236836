"""Activation-aware weight quantization (AWQ): per-channel scale search and clip search.

For each decoder layer, one at a time (only that layer and its activations on the device):

1. Run the *original* layer over all calibration blocks. Hooks record, for the first linear of
   each scale group (see :mod:`tinyq.quant.arch`), the mean ``x̄ = mean|x|`` of every input
   channel over all tokens, and keep the inputs of the ``search_blocks`` blocks the losses use.
   The outputs are the next layer's inputs.
2. Auto-scale, per group: for ``α ∈ {0, 1/n, …, (n-1)/n}`` try
   ``s = x̄^α / w̄^(1-α)`` (``duo_scaling``; ``w̄`` = mean over output rows of ``|W|`` normalised per
   quantization group) or ``s = x̄^α``, clamped ≥ 1e-4 and divided by ``sqrt(max(s)·min(s))``; set the
   group's weights to ``Q(W·s)/s`` and measure the fp32 MSE at the inspected module's output against
   the original. The best ``s`` is folded: previous op's output ÷ s, the linears' columns × s.
3. Auto-clip, per linear except q/k: per (output row, group), shrink the group's range
   ``[min, max]`` by ``r = 1 - i/clip_grid`` for ``i < clip_grid·max_shrink`` and keep the ``r`` with the
   lowest error of the group's partial dot products on ``clip_tokens`` sampled tokens; with
   ``clip_asym`` each end is then refined on its own (``[min·r_lo, max·r_hi]``). The layer's weights
   are clamped in place.

The model is changed in place (scales folded, weights clipped, still in floating point); the
choices are returned as :class:`AwqResults`, which save/load and re-apply to a fresh model
(:func:`apply_awq`). Quantization itself is :func:`fake_quantize_model_` or
:func:`tinyq.quant.checkpoint.save_quantized`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from tinyq.quant.arch import decoder_of, expand_v_to_o, family_for, layer_kwargs, reduce_o_to_v, run_module
from tinyq.quant.format import GROUP_SIZES, fake_quantize, group_scale_zero, quantize_to_grid, scale_dtype_for


@dataclass
class AwqConfig:
    w_bit: int = 4
    group_size: int = 64
    n_grid: int = 20  # α steps of the scale search
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5  # clip ratios 1, 0.95, …, 0.55
    clip_tokens: int = 512
    # Also shrink each end of a group's range on its own. SmolLM2-135M w4g64, 12 handbook windows:
    # no clip 27.66 PPL, one ratio for both ends 28.07 (worse; 8 loss blocks, the others 4),
    # + per-end refinement 26.79 (fp 24.57).
    clip_asym: bool = True
    search_blocks: Optional[int] = None  # calibration blocks the losses use (None: all)
    batch_blocks: int = 8  # blocks per forward call (bounds activation memory)

    def __post_init__(self):
        if self.w_bit not in (3, 4):
            raise ValueError(f"w_bit={self.w_bit}: AWQ search supports 3 or 4 bits")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported; choose one of {GROUP_SIZES}")
        for name in ("n_grid", "clip_grid", "clip_tokens", "batch_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if self.search_blocks is not None and (not isinstance(self.search_blocks, int) or self.search_blocks < 1):
            raise ValueError(f"search_blocks={self.search_blocks!r}: must be a positive integer or None (all blocks)")
        if self.clip and not (0.0 < self.max_shrink < 1.0 and int(self.clip_grid * self.max_shrink) >= 1):
            raise ValueError(f"max_shrink={self.max_shrink!r} with clip_grid={self.clip_grid}: the clip search needs "
                             "0 < max_shrink < 1 and at least one ratio (clip_grid * max_shrink >= 1)")


@dataclass
class AwqResults:
    """Search results: ``scales["layers.{i}.{prev}"]`` (fp32, prev op's output width) and
    ``clips["layers.{i}.{linear}"]`` (fp32 ratios ``[N, K/G, 2]``: lower, upper end)."""

    config: dict
    family: str
    num_layers: int
    scales: dict = field(default_factory=dict)
    clips: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensors ``scale.<key>`` / ``clip.<key>``, settings in the metadata."""
        from safetensors.torch import save

        tensors = {f"scale.{k}": v.float().contiguous().cpu() for k, v in self.scales.items()}
        tensors.update({f"clip.{k}": v.float().contiguous().cpu() for k, v in self.clips.items()})
        meta = {"tinyq_awq": json.dumps({"config": self.config, "family": self.family, "num_layers": self.num_layers})}
        return save(tensors, metadata=meta)

    def save(self, path) -> None:
        """Written whole or not at all (a failed save keeps the previous file)."""
        from tinyq.atomic_io import write_file

        write_file(path, self.to_bytes())

    @classmethod
    def load(cls, path) -> "AwqResults":
        """Read a file :meth:`save` wrote; anything else is a ValueError (a FileNotFoundError if
        missing) naming ``path``."""
        with _open_results(path) as f:
            info = _results_info(f, path)
            out = cls(info["config"], info["family"], info["num_layers"])
            for key in f.keys():
                kind, _, name = key.partition(".")
                if kind not in ("scale", "clip") or not name:
                    raise ValueError(f"{path}: tensor {key!r} is neither 'scale.<op>' nor 'clip.<linear>'")
                (out.scales if kind == "scale" else out.clips)[name] = f.get_tensor(key)
        return out

    @staticmethod
    def read_info(path) -> dict:
        """The settings a results file was searched with (``config``, ``family``, ``num_layers``),
        from its header only: a cheap check of a file before a model is loaded to apply it."""
        with _open_results(path) as f:
            return _results_info(f, path)


def _open_results(path):
    """``safe_open`` of a search-results file, with errors that name it."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file or directory: {path} (AWQ search results)")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not an AWQ search-results file")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from exc


def _results_info(f, path) -> dict:
    """The ``tinyq_awq`` metadata of an open results file: ``config``, ``family``, ``num_layers``."""
    meta = (f.metadata() or {}).get("tinyq_awq")
    if meta is None:
        raise ValueError(f"{path} is not a tinyq AWQ search-results file (no 'tinyq_awq' metadata)")
    try:
        info = json.loads(meta)
        if not (isinstance(info, dict) and {"config", "family", "num_layers"} <= info.keys()
                and isinstance(info["config"], dict)):
            raise ValueError("config, family or num_layers missing")
    except ValueError as exc:
        raise ValueError(f"{path}: its 'tinyq_awq' metadata is not what tinyq writes ({exc})") from None
    return info


class Progress:
    """A line-based progress bar on stderr (one line per step; no tqdm dependency)."""

    def __init__(self, total: int, what: str, enabled: bool = True):
        self.total, self.what, self.enabled, self.t0, self.done = total, what, enabled, time.time(), 0

    def step(self, note: str = "") -> None:
        import sys

        self.done += 1
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        bar = "#" * (20 * self.done // self.total)
        print(f"[{bar:<20}] {self.what} {self.done}/{self.total}  {elapsed:.0f}s elapsed, ~{left:.0f}s left {note}",
              file=sys.stderr, flush=True)


# --- helpers -------------------------------------------------------------------------------------

def _weight_mean(weights, group_size: int) -> torch.Tensor:
    """``w̄`` per input channel: |W| normalised by its quantization group's max, averaged over rows."""
    w = torch.cat([x.float() for x in weights], dim=0)
    k = w.shape[1]
    g = w.abs().view(-1, k // group_size, group_size)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return g.view(-1, k).mean(0)


def _is_gqa(layer: nn.Module, prev_name: str, linear_names) -> bool:
    """v_proj -> o_proj with fewer v channels than o inputs (grouped-query attention)."""
    prev = layer.get_submodule(prev_name)
    return isinstance(prev, nn.Linear) and prev.out_features != layer.get_submodule(linear_names[0]).in_features


def _input_scale(layer, prev_name, linear_names, s):
    """The scale of the prev op's outputs, as seen by the linears' inputs."""
    return expand_v_to_o(s, layer.self_attn) if _is_gqa(layer, prev_name, linear_names) else s


def _fold_scale(layer: nn.Module, prev_name: str, linear_names, s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' input channels by ``s``."""
    prev = layer.get_submodule(prev_name)
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):  # v_proj -> o_proj, up_proj -> down_proj
        prev.weight.data.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    else:  # RMSNorm: y = x / rms(x) * weight
        prev.weight.data.div_(s.to(prev.weight.dtype))
    s_in = _input_scale(layer, prev_name, linear_names, s)
    for name in linear_names:
        lin = layer.get_submodule(name)
        lin.weight.data.mul_(s_in.view(1, -1).to(lin.weight.dtype))


def clip_weight_(weight: torch.Tensor, ratio: torch.Tensor, group_size: int) -> None:
    """Clamp each (row, group) of ``weight [N, K]`` to ``[min·r_lo, max·r_hi]``, in place; ``ratio`` is
    ``[N, K/G]`` (one ratio for both ends) or ``[N, K/G, 2]`` (``r_lo, r_hi``)."""
    n, k = weight.shape
    g = weight.data.view(n, k // group_size, group_size)
    r = ratio.to(device=weight.device, dtype=torch.float32)
    r_lo, r_hi = (r[..., 0:1], r[..., 1:2]) if r.dim() == 3 else (r.unsqueeze(-1), r.unsqueeze(-1))
    lo = (g.float().amin(dim=-1, keepdim=True) * r_lo).to(weight.dtype)
    hi = (g.float().amax(dim=-1, keepdim=True) * r_hi).to(weight.dtype)
    g.copy_(torch.maximum(torch.minimum(g, hi), lo))


def overflow_error(where: str, what: str, dtype: torch.dtype, step: str = "AWQ search") -> ValueError:
    """``step`` (AWQ's search, SmoothQuant's calibration) cannot go on: its activations, statistics or
    losses hold inf/NaN, and a scale chosen from them would fold NaN into the weights or be written as NaN."""
    if dtype == torch.float16:
        why = ("float16 activations overflow above 65504: run it in float32 or bfloat16 (on the CPU it runs in "
               "float32: --device cpu)")
    else:
        name = str(dtype).replace("torch.", "")
        why = (f"in {name} that points at weights or embeddings that are not finite, or so large that {name} "
               "overflows (a float16 overflow is avoided by running in float32 or bfloat16)")
    return ValueError(f"{step}, {where}: {what} hold inf/NaN, so no scale can be chosen; {why}")


@torch.no_grad()
def _search_scale(layer, group, x_mean, inputs, kw, cfg, where: str = "") -> torch.Tensor:
    """Best scale for one group; returns ``s`` with the prev op's output width (fp32). ``x_mean``
    must be finite (the caller checks); a ValueError naming ``where`` if no ``α`` gives a finite loss."""
    linears = [layer.get_submodule(n) for n in group.linears]
    inspect = layer.get_submodule(group.inspect) if group.inspect else linears[0]
    gqa = _is_gqa(layer, group.prev, group.linears)
    w_mean = _weight_mean([lin.weight for lin in linears], cfg.group_size)
    if gqa:  # one scale per v channel, shared by the query heads reading it
        x_mean, w_mean = reduce_o_to_v(x_mean, layer.self_attn), reduce_o_to_v(w_mean, layer.self_attn)
    originals = [lin.weight.data.clone() for lin in linears]
    refs = [run_module(inspect, x, kw) for x in inputs]  # kept in the model dtype; losses in fp32
    best, best_loss = None, float("inf")
    for i in range(cfg.n_grid):
        alpha = i / cfg.n_grid
        s = x_mean.pow(alpha) / w_mean.pow(1 - alpha) if cfg.duo_scaling else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s_in = expand_v_to_o(s, layer.self_attn) if gqa else s
        for lin, w in zip(linears, originals):
            scaled = w.float() * s_in.view(1, -1)
            wq = fake_quantize(scaled, cfg.group_size, cfg.w_bit, scale_dtype_for(w.dtype))  # scales as stored
            lin.weight.data.copy_(wq / s_in.view(1, -1))
        loss = sum((run_module(inspect, x, kw).float() - r.float()).pow(2).sum().item() for x, r in zip(inputs, refs))
        if loss < best_loss:
            best, best_loss = s.clone(), loss
    for lin, w in zip(linears, originals):
        lin.weight.data.copy_(w)
    if best is None:  # every loss was NaN/inf: the module's own output overflows
        raise overflow_error(where or group.prev, f"the losses of every alpha at {group.inspect or group.linears[0]}",
                              originals[0].dtype)
    return best


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, cfg: AwqConfig, rows_per_step: int = None) -> torch.Tensor:
    """Best clip ratios per (row, group) of ``weight [N, K]`` for inputs ``x [T, K]``: fp32 ``[N, K/G, 2]``
    (``r_lo, r_hi``). First one ratio for both ends; with ``cfg.clip_asym`` then each end alone
    (coordinate search, 3x the candidates of the symmetric search)."""
    n, k = weight.shape
    gs = cfg.group_size
    # Rows per step bound the [groups, T, rows] fp32 products: 470 MB for an 8B down_proj at 1024 rows
    # on a GPU (fewer, larger launches); 256 rows keep CPU temporaries cache-friendly.
    rows_per_step = rows_per_step or (1024 if weight.is_cuda else 256)
    xg = x.float().view(-1, k // gs, gs).transpose(0, 1)  # [groups, T, G]
    ratios = [1 - i / cfg.clip_grid for i in range(int(cfg.clip_grid * cfg.max_shrink))]
    scale_dtype = scale_dtype_for(weight.dtype)  # as stored
    out = torch.empty(n, k // gs, 2, device=weight.device)
    for r0 in range(0, n, rows_per_step):
        w = weight[r0 : r0 + rows_per_step].float().view(-1, k // gs, gs)  # [n', groups, G]
        ref = torch.bmm(xg, w.permute(1, 2, 0))  # [groups, T, n']
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)

        def error(r_lo, r_hi):  # [n', groups]
            # Quantizing the clamped group is quantizing with its range [lo', hi']; values outside it
            # land on the end levels through the clamp of q (format.quantize_groupwise's math).
            lo_c = torch.maximum(lo, lo * r_lo.unsqueeze(-1))
            hi_c = torch.minimum(hi, hi * r_hi.unsqueeze(-1))
            scale, zero = group_scale_zero(lo_c, hi_c, cfg.w_bit, scale_dtype)
            wq = (quantize_to_grid(w, scale, zero, cfg.w_bit) - zero) * scale
            return (torch.bmm(xg, wq.permute(1, 2, 0)) - ref).pow(2).mean(dim=1).t()

        ones = torch.ones(w.shape[:2], device=w.device)
        best_lo, best_hi = ones.clone(), ones.clone()
        best_err = torch.full(w.shape[:2], float("inf"), device=w.device)
        passes = [("both", ratios)] + ([("lo", ratios[1:]), ("hi", ratios[1:])] if cfg.clip_asym else [])
        for end, candidates in passes:
            for r in candidates:
                r_lo = ones * r if end != "hi" else best_lo
                r_hi = ones * r if end != "lo" else best_hi
                err = error(r_lo, r_hi)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo, best_hi = torch.where(better, r_lo, best_lo), torch.where(better, r_hi, best_hi)
        out[r0 : r0 + rows_per_step] = torch.stack([best_lo, best_hi], dim=-1)
    return out


def _sample_tokens(chunks, n: int) -> torch.Tensor:
    """About ``n`` tokens ``[n, C]`` taken evenly from a list of ``[B, L, C]`` inputs (no full concat:
    the down_proj inputs of 128 x 512 tokens of an 8B model are 1.9 GB)."""
    total = sum(t.shape[0] * t.shape[1] for t in chunks)
    step = max(1, total // n)
    return torch.cat([t.reshape(-1, t.shape[-1])[::step] for t in chunks])[:n]


# --- the search ----------------------------------------------------------------------------------

@torch.no_grad()
def _layer_pass(layer, fam, x, kw, sums, kept, keep: bool) -> torch.Tensor:
    """Original-layer forward over blocks ``x``; adds each group input's ``sum|x|`` per channel to
    ``sums`` and, if ``keep``, appends the inputs to ``kept``. Returns the layer output."""
    def hook(name):
        def fn(_mod, args):
            a = args[0].detach()
            sums[name] = sums.get(name, 0) + a.abs().float().reshape(-1, a.shape[-1]).sum(0)
            if keep:
                kept.setdefault(name, []).append(a)
        return fn

    hooks = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in {g.linears[0] for g in fam.groups}]
    try:
        return run_module(layer, x, kw)
    finally:
        for h in hooks:
            h.remove()


def _chunks(n: int, n_search: int, step: int):
    """Block ranges with a boundary at ``n_search`` (so search blocks are exactly the first ones)."""
    for lo, hi in ((0, n_search), (n_search, n)):
        for s in range(lo, hi, step):
            yield s, min(s + step, hi)


@torch.no_grad()
def awq_search(model: nn.Module, blocks: torch.Tensor, cfg: AwqConfig = None, device=None,
               progress: bool = True) -> AwqResults:
    """Search AWQ scales and clips for every decoder layer of ``model``; changes ``model`` in place.

    ``blocks``: int64 token ids ``[n_blocks, block_len]``. ``device``: where each layer runs
    (default: where the model is). Layers return to their original device afterwards.
    """
    cfg = cfg or AwqConfig()
    fam = family_for(model.config)
    dec = decoder_of(model)
    layers = dec.layers
    for layer in layers:
        for name in fam.linears:
            k = layer.get_submodule(name).in_features
            if k % cfg.group_size:
                raise ValueError(f"{name}: in_features={k} is not divisible by group_size={cfg.group_size}")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    n = blocks.shape[0]
    n_search = min(cfg.search_blocks or n, n)
    # The loss blocks, spread evenly over the calibration set, go first.
    picked = torch.linspace(0, n - 1, n_search).round().long().tolist()
    order = picked + [i for i in range(n) if i not in set(picked)]
    x = dec.embed_tokens(blocks[order].to(dec.embed_tokens.weight.device)).to(device)  # [n, L, H]
    rotary_home = next(dec.rotary_emb.buffers()).device
    dec.rotary_emb.to(device)
    kw = layer_kwargs(dec, x[:1])
    results = AwqResults(asdict(cfg), fam.name, len(layers))
    bar = Progress(len(layers), "AWQ layers", progress)
    try:
        for i, layer in enumerate(layers):
            layer.to(device)
            outs, sums, kept = [], {}, {}
            for lo, hi in _chunks(n, n_search, cfg.batch_blocks):
                outs.append(_layer_pass(layer, fam, x[lo:hi], kw, sums, kept, keep=hi <= n_search))
            x_mean = {name: v / (n * blocks.shape[1]) for name, v in sums.items()}
            for group in fam.groups:
                first = group.linears[0]
                if first not in kept:
                    continue
                where = f"layer {i}, scale group {group.prev} -> {', '.join(group.linears)}"
                if not torch.isfinite(x_mean[first]).all():  # before a NaN scale is folded into the weights
                    raise overflow_error(where, f"the inputs of {first}", x.dtype)
                s = _search_scale(layer, group, x_mean[first], kept[first], kw, cfg, where)
                _fold_scale(layer, group.prev, group.linears, s)
                results.scales[f"layers.{i}.{group.prev}"] = s.float().cpu()
                s_in = _input_scale(layer, group.prev, group.linears, s)
                for t in kept[first]:  # the linears now see x / s (hook tensors are used by nothing else)
                    t.div_(s_in.to(t.dtype))
            if cfg.clip:
                for group in fam.groups:
                    x_in = _sample_tokens(kept[group.linears[0]], cfg.clip_tokens)
                    for name in group.linears:
                        if name in fam.no_clip:
                            continue
                        lin = layer.get_submodule(name)
                        ratio = search_clip(lin.weight, x_in, cfg)
                        clip_weight_(lin.weight, ratio, cfg.group_size)
                        results.clips[f"layers.{i}.{name}"] = ratio.cpu()
            x = torch.cat(outs)
            layer.to(home)
            bar.step()
    finally:
        dec.rotary_emb.to(rotary_home)
    return results


@torch.no_grad()
def apply_awq(model: nn.Module, results: AwqResults) -> nn.Module:
    """Fold saved scales and apply saved clips to a fresh (unmodified) model, in place.

    Every scale and clip is checked against the model before the first is applied: results that do
    not fit (another width, layer count or family) are a ValueError and leave the model untouched,
    so a retry with the right results does not fold scales twice."""
    fam = family_for(model.config)
    if fam.name != results.family:
        raise ValueError(f"search results are for the {results.family!r} family, the model is {fam.name!r}")
    layers = decoder_of(model).layers
    if len(layers) != results.num_layers:
        raise ValueError(f"search results cover {results.num_layers} layers, the model has {len(layers)}")
    gs = results.config.get("group_size")
    if not isinstance(gs, int) or gs < 1:
        raise ValueError(f"search results: config group_size {gs!r} is not a positive integer")
    for i, layer in enumerate(layers):
        _check_layer_results(i, layer, fam, results, gs)
    # Nothing below raises for results that passed the checks: the model is changed whole or not at all.
    for i, layer in enumerate(layers):
        for group in fam.groups:
            key = f"layers.{i}.{group.prev}"
            if key in results.scales:
                _fold_scale(layer, group.prev, group.linears, results.scales[key])
        for name in fam.linears:
            key = f"layers.{i}.{name}"
            if key in results.clips:
                clip_weight_(layer.get_submodule(name).weight, results.clips[key], gs)
    return model


def _check_layer_results(i: int, layer: nn.Module, fam, results: AwqResults, gs: int) -> None:
    """A ValueError naming the first of layer ``i``'s scales or clips that does not fit the model:
    a shape other than the layer's, or a value a fold would turn into inf/NaN weights."""
    for group in fam.groups:
        key = f"layers.{i}.{group.prev}"
        if key not in results.scales:
            continue
        s = results.scales[key]
        prev = layer.get_submodule(group.prev)
        width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]
        if tuple(s.shape) != (width,):
            raise ValueError(f"scale {key}: shape {tuple(s.shape)} does not match the model's ({width},)")
        if not (torch.isfinite(s).all() and (s > 0).all()):  # the prev op's outputs are divided by s
            raise ValueError(f"scale {key}: holds values that are not finite and positive, so folding it would "
                             "put inf/NaN into the weights")
    for name in fam.linears:
        key = f"layers.{i}.{name}"
        if key not in results.clips:
            continue
        ratio = results.clips[key]
        n, k = layer.get_submodule(name).weight.shape
        if k % gs:
            raise ValueError(f"clip {key}: the model's in_features={k} is not divisible by the results' "
                             f"group_size={gs}")
        want = (n, k // gs)
        if tuple(ratio.shape[:2]) != want or tuple(ratio.shape[2:]) not in ((), (2,)):
            raise ValueError(f"clip {key}: shape {tuple(ratio.shape)} does not match {want} or {want + (2,)}")
        if not torch.isfinite(ratio).all():
            raise ValueError(f"clip {key}: holds inf/NaN ratios")


@torch.no_grad()
def fake_quantize_model_(model: nn.Module, w_bit: int, group_size: int) -> nn.Module:
    """Replace every decoder-layer linear weight by ``Q(W)`` (dequantized, same dtype), in place."""
    fam = family_for(model.config)
    for layer in decoder_of(model).layers:
        for name in fam.linears:
            w = layer.get_submodule(name).weight
            w.data.copy_(fake_quantize(w.data, group_size, w_bit))
    return model
