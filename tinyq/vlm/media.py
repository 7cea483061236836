"""Image and video input for the VLMs: reading files, LLaVA's pad-to-square, video frame sampling,
and the towers' image processors (transformers' where they exist).

Pillow is the optional extra ``tinyq[vlm]``; mp4 and other containers need PyAV (``av``), also
optional. A directory of frames or an animated GIF always works.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

# The towers' published preprocessing (transformers' CLIPImageProcessor / SiglipImageProcessor defaults).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("image input needs Pillow: pip install 'tinyq[vlm]'") from exc
    return Image


def is_image(obj) -> bool:
    """Whether ``obj`` is a PIL image."""
    Image = _pil()
    return isinstance(obj, Image.Image)


def as_path(path, expected: str) -> str:
    """``path`` (a str, bytes or ``os.PathLike``) as a str; anything else is a TypeError saying what
    was ``expected``."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"expected {expected}, got {type(path).__name__}")
    return os.fsdecode(path)


def load_image(image):
    """A path (str or ``os.PathLike``) or a PIL image -> an RGB PIL image (:func:`to_rgb`); an
    unreadable file is a ValueError naming it. A file is turned as its EXIF orientation says (as
    transformers' ``load_image`` does: a phone photo reaches the model upright)."""
    Image = _pil()
    if isinstance(image, Image.Image):
        return to_rgb(image)
    image = as_path(image, "an image path (str or os.PathLike) or a PIL image")
    if not os.path.isfile(image):
        raise ValueError(f"image not found: {image}")
    try:
        from PIL import ImageOps

        with Image.open(image) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as exc:  # PIL raises several types for a bad file
        raise ValueError(f"cannot read image {image}: {exc}") from exc


def to_rgb(image):
    """RGB as transformers' processors make it (``image_transforms.convert_to_rgb``): an image with an
    alpha band (RGBA, LA, PA) or a ``transparency`` entry (the transparent colour of a grey, palette or
    RGB PNG) is laid on white; anything else is converted as Pillow does. Two additions: 16- and 32-bit
    grey images are scaled to 8 bits (Pillow's own conversion clips them, so most of a 16-bit photo
    would turn white), and premultiplied grey + alpha ("La", which Pillow cannot turn into RGB) is
    un-premultiplied to LA first. A mode Pillow cannot convert is a ValueError naming it."""
    Image = _pil()
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = _grey_to_8_bits(image)
    if image.mode == "La":
        image = image.convert("LA")
    try:
        if _has_transparency(image):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:  # Pillow: "conversion from X to Y not supported"
        raise ValueError(f"cannot convert a {image.mode} image to RGB ({exc})") from exc


def _has_transparency(image) -> bool:
    """transformers' test: an "A" band, or a transparent colour or palette alpha in ``info``. The
    premultiplied "a" of RGBa does not count (transformers converts RGBa straight to RGB too)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _grey_to_8_bits(image):
    """A 16-bit (``I;16*``: full scale 65535) or 32-bit (``I``: full scale its maximum) grey image as L."""
    import numpy as np

    Image = _pil()
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
    return Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")


def expand_to_square(image, mean: Sequence[float]):
    """LLaVA-1.5's ``image_aspect_ratio="pad"``: centre the image on a square of the mean colour
    (haotian-liu/LLaVA llava/mm_utils.py ``expand2square``; NVlabs/VILA llava/mm_utils.py)."""
    Image = _pil()
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def image_processor(kind: str, image_size: int, folder: Optional[str] = None):
    """The tower's image processor: ``folder``'s ``preprocessor_config.json`` when there is one,
    else transformers' CLIP (resize shortest side + centre crop, CLIP mean/std) or SigLIP (bicubic
    resize to a square, mean = std = 0.5) processor for ``image_size``."""
    import transformers

    if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    if kind == "clip":
        cls = _processor_class(transformers, "CLIPImageProcessor")
        return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    cls = _processor_class(transformers, "SiglipImageProcessor")
    return cls(size={"height": image_size, "width": image_size}, image_mean=list(SIGLIP_MEAN),
               image_std=list(SIGLIP_STD))


def _processor_class(transformers, name: str):
    """transformers >= 5 names the Pillow-only processor ``<name>Pil`` (the default one wants torchvision)."""
    return getattr(transformers, name + "Pil") if hasattr(transformers, name + "Pil") else getattr(transformers, name)


def pixel_values(processor, images: Sequence):
    """PIL images -> float32 ``[N, 3, S, S]``."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"].float()


def uniform_indices(total: int, n: int) -> List[int]:
    """``n`` frame indices spread evenly over ``total`` frames, first and last included:
    ``round(linspace(0, total - 1, n))`` with ties to even, the frames VILA's loader picks
    (NVlabs/VILA llava/utils/media.py, ``_load_video``), so a video gives the model its training inputs.
    With ``n > total`` some frames repeat (3 of 8: 0, 0, 1, 1, 1, 1, 2, 2), as in VILA."""
    if n < 1 or total < 1:
        raise ValueError(f"cannot pick {n} of {total} frames")
    if n == 1:
        return [0]
    step = (total - 1) / (n - 1)  # numpy's linspace arithmetic, so ties fall as they fall there
    return [round(i * step) for i in range(n - 1)] + [total - 1]


def _check_length(path, total: int, num_frames: int, repeat_short: bool) -> None:
    """A clip shorter than asked is an error unless ``repeat_short``."""
    if total < num_frames and not repeat_short:
        raise ValueError(f"video {path} has {total} frame(s), fewer than the {num_frames} asked for: ask for at "
                         f"most {total}, or let frames repeat as VILA's loader does (repeat_short=True)")


def _pick(path, total: int, num_frames: int, repeat_short: bool) -> List[int]:
    """The frame indices to keep (:func:`uniform_indices`), after :func:`_check_length`."""
    _check_length(path, total, num_frames, repeat_short)
    return uniform_indices(total, num_frames)


def load_video_frames(path, num_frames: int, repeat_short: bool = False) -> List:
    """``num_frames`` RGB frames sampled uniformly (:func:`uniform_indices`) from a directory of
    images (sorted by name; extensions :data:`FRAME_EXTENSIONS`), an animated GIF/WebP, or (with PyAV
    installed) a video file. A clip with fewer frames than asked is a ValueError saying how many it
    has, unless ``repeat_short``: then some frames repeat, as VILA's loader repeats them. A clip with
    no frame at all is a ValueError naming it."""
    Image = _pil()
    path = as_path(path, "a video path (str or os.PathLike)")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
        if not files:
            raise ValueError(f"frames directory {path} has no frame images (files ending in "
                             f"{', '.join(FRAME_EXTENSIONS)})")
        return [load_image(os.path.join(path, files[i])) for i in _pick(path, len(files), num_frames, repeat_short)]
    if not os.path.isfile(path):
        raise ValueError(f"video not found: {path}")
    if path.lower().endswith((".gif", ".webp")):
        try:
            with Image.open(path) as im:
                total, frames = getattr(im, "n_frames", 1), []  # a still image: 1 frame
                if total >= num_frames or repeat_short:
                    for i in uniform_indices(total, num_frames):
                        im.seek(i)
                        frames.append(to_rgb(im))
        except Exception as exc:
            raise ValueError(f"cannot read video {path}: {exc}") from exc
        _check_length(path, total, num_frames, repeat_short)
        return frames
    try:
        import av
    except ImportError as exc:
        raise ValueError(f"{path}: reading video files needs PyAV (pip install av); a directory of frames "
                         "or an animated GIF works without it") from exc
    try:
        with av.open(path) as container:
            total = container.streams.video[0].frames  # 0 where the container does not say
        trusted = total >= (1 if repeat_short else num_frames)  # a short count is checked by decoding
        frames = _decode_frames(av, path, total, num_frames, repeat_short) if trusted else None
        if frames is None:  # no frame count, a wrong or a short one: count by decoding, then pick
            with av.open(path) as container:
                total = sum(1 for _ in container.decode(video=0))
            if total == 0:
                raise ValueError(f"video {path} has no frame that PyAV can decode")
            frames = _decode_frames(av, path, total, num_frames, repeat_short)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read video {path}: {exc}") from exc
    return frames


def _decode_frames(av, path: str, total: int, num_frames: int, repeat_short: bool):
    """The ``uniform_indices(total, num_frames)`` frames of the video at ``path``, decoding through it
    but keeping only those (a long video's frames do not all fit in memory); None when it has fewer
    than ``total`` frames after all."""
    picks = _pick(path, total, num_frames, repeat_short)
    wanted, kept = set(picks), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_image().convert("RGB")
                if len(kept) == len(wanted):
                    break
    return [kept[i] for i in picks] if len(kept) == len(wanted) else None
