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


def load_image(image):
    """A path (or a PIL image) -> an RGB PIL image; an unreadable file is a ValueError naming it."""
    Image = _pil()
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not os.path.isfile(image):
        raise ValueError(f"image not found: {image}")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several types for a bad file
        raise ValueError(f"cannot read image {image}: {exc}") from exc


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
    (NVlabs/VILA llava/utils/media.py, ``_load_video``), so a video gives the model its training inputs."""
    if n < 1 or total < 1:
        raise ValueError(f"cannot pick {n} of {total} frames")
    if n == 1:
        return [0]
    step = (total - 1) / (n - 1)  # numpy's linspace arithmetic, so ties fall as they fall there
    return [round(i * step) for i in range(n - 1)] + [total - 1]


def load_video_frames(path: str, num_frames: int) -> List:
    """``num_frames`` RGB frames sampled uniformly from a directory of images (sorted by name), an
    animated GIF/WebP, or (with PyAV installed) a video file. Fewer frames than asked is a ValueError."""
    Image = _pil()
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
        _enough(path, len(files), num_frames)
        return [load_image(os.path.join(path, files[i])) for i in uniform_indices(len(files), num_frames)]
    if not os.path.isfile(path):
        raise ValueError(f"video not found: {path}")
    if path.lower().endswith((".gif", ".webp")):
        try:
            with Image.open(path) as im:
                total = getattr(im, "n_frames", 1)
                _enough(path, total, num_frames)
                frames = []
                for i in uniform_indices(total, num_frames):
                    im.seek(i)
                    frames.append(im.convert("RGB"))
                return frames
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot read video {path}: {exc}") from exc
    try:
        import av
    except ImportError as exc:
        raise ValueError(f"{path}: reading video files needs PyAV (pip install av); a directory of frames "
                         "or an animated GIF works without it") from exc
    try:
        with av.open(path) as container:
            frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    except Exception as exc:
        raise ValueError(f"cannot read video {path}: {exc}") from exc
    _enough(path, len(frames), num_frames)
    return [frames[i] for i in uniform_indices(len(frames), num_frames)]


def _enough(path: str, have: int, want: int) -> None:
    if have < want:
        raise ValueError(f"video {path} has {have} frame(s), fewer than the {want} asked for")
