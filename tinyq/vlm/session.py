"""Multi-turn chat with images and video over one static KV cache.

A :class:`VLMChatSession` is a :class:`tinyq.chat.ChatSession` (same turn, rollback and overflow
rules) whose prompt may hold images:

- ``add_images`` / ``add_video`` encode the media at once (vision tower + projector), once: the
  feature rows are kept for the whole conversation, and the next ``send`` places the new media
  items before its text (a video is one item where the model has a video encoder, VILA / NVILA:
  :mod:`tinyq.models.vila_video`; else one per frame). Media that could not fit the cache even in a
  conversation of their own are refused when added; ``drop_pending_media`` discards those not yet sent.
- Each user message of the history records how many media items went before its text
  (``message["media"]``, written when its answer completes): the count, not the text, says where
  the images are. ``<image>`` written in any message's text is text, and is removed before
  rendering, as VILA's ``extract_media`` removes it (NVlabs/VILA llava/utils/media.py): only real
  media become placeholders.
- Rendering: the model's legacy conversation format where it has one (VILA-1.5,
  :mod:`tinyq.vlm.conversation`), else the chat template (the tokenizer's, else the model family's),
  over messages whose text holds one ``<image>`` marker per media item; each marker becomes the
  model's placeholder ids for that item (:meth:`VisionLanguageModel.placeholder_ids`; a video's rows
  hold their own framing tokens, so its placeholder is just one image token per row), and the
  session records at which absolute position each item's rows start. A tokenizer that puts a BOS
  before a text (Llama's ``<s>``) gets one at the start of the conversation where the template
  writes none, as the reference processors' tokenizer call adds it.
- Prefill goes through :class:`tinyq.generate.Generator` with an ``embed_fn`` that embeds the ids
  and writes the feature rows over the image positions that fall in the chunk. Later turns reuse
  the cached prefix (context streaming), so they prefill only their new text; a new image in a
  later turn is encoded when added and only its rows are prefilled.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tinyq.chat import ChatSession, check_message
from tinyq.generate import DeltaStream, Generator
from tinyq.models.vlm import IMAGE_MARKER, VisionLanguageModel, expand_images
from tinyq.vlm import media
from tinyq.vlm.conversation import tokenize_pieces
from tinyq.warmup import CompileTracker, WarmupReport, warm_up

MEDIA = "media"  # a user message's key: how many media items go before its text


@dataclass
class MediaItem:
    """One image or video of the conversation, encoded."""
    rows: torch.Tensor  # [tokens, hidden] feature rows that replace its placeholders
    vision_s: float  # its share of its batch's encoder time
    video: bool  # one media item of many frames (its rows hold their own framing tokens)
    serial: int  # unique in this session; its placeholder ids are not
    source: Any = None  # the loaded image, kept until sent, to encode it again with its message's others
    alone: bool = False  # encoded in a batch of one


class VLMChatSession(ChatSession):
    """Chat with ``model`` (a :class:`VisionLanguageModel`); ``max_seq_len`` bounds the cache."""

    def __init__(self, model: VisionLanguageModel, tokenizer, max_seq_len: Optional[int] = None,
                 system_prompt: Optional[str] = None, sampling=None, **settings):
        self.vlm = model
        self._items: List[MediaItem] = []  # in conversation order
        self._slots: List[Tuple[int, int]] = []  # (first position, item index) in the rendered prompt
        self.last_vision_s = 0.0  # the last add_images' encoder time, Triton compilation excluded
        self.last_vision_compile_s = 0.0  # ... and the compilation it excluded (first use of a shape)
        self.last_vision_capture_s = 0.0  # ... and the tower's CUDA-graph captures (first use of a chunk size)
        self._next_serial = 0
        self._cached_items: Dict[int, int] = {}  # first position -> serial of the items the cache was filled with
        self._bos = _default_bos(tokenizer)
        gen = Generator(model.llm, tokenizer, max_seq_len, embed_fn=self._embed)
        super().__init__(model.llm, tokenizer, system_prompt=system_prompt, sampling=sampling, generator=gen,
                         **settings)
        fmt = model.conversation
        if fmt is not None:  # a legacy format's answers end with its own token (</s>, <|im_end|>, <|eot_id|>)
            end = tokenizer.convert_tokens_to_ids(fmt.end)
            if end is None or end == tokenizer.unk_token_id:
                raise ValueError(f"the {fmt.name!r} conversation format ends answers with {fmt.end!r}, which this "
                                 "tokenizer does not have as a token")
            gen.eos_ids = gen.eos_ids | {end}

    # ------------------------------------------------------------------ media

    @property
    def images(self) -> List[torch.Tensor]:
        """Each media item's ``[tokens, hidden]`` feature rows, in conversation order."""
        return [item.rows for item in self._items]

    @property
    def pending_images(self) -> int:
        """Media items added but not yet sent with a message."""
        return len(self._items) - self._sent_images()

    @property
    def pending_vision_s(self) -> float:
        """Encoder time of the images that go with the next message (every add since the last send)."""
        return sum(item.vision_s for item in self._items[self._sent_images():])

    def _sent_images(self) -> int:
        """Media items sent so far: the sum of the history's user messages' records."""
        return sum(m.get(MEDIA, 0) for m in self.messages if m["role"] == "user")

    def add_images(self, images) -> List[int]:
        """Encode ``images`` (paths or PIL images, or one of either) now; they go with the next
        message. Several at once are encoded as one batch (NVILA then gives each one tile). Returns
        tokens per image. Images that could not fit the cache even alone in a new conversation
        are a ValueError, and nothing is added."""
        images = _as_list(images)
        if not images:
            raise ValueError("add_images: no images given")
        loaded = [media.load_image(im) for im in images]  # an unreadable file fails before any work
        return self._add_images(loaded, _describe_images(images))

    def _add_images(self, loaded: list, label: str) -> List[int]:
        feats = self._timed(self.vlm.encode_images, loaded)
        return self._add_media(feats, video=False, label=label, sources=loaded)

    def add_video(self, path, num_frames: Optional[int] = None) -> List[int]:
        """``num_frames`` frames sampled uniformly from ``path`` (:func:`tinyq.vlm.media.load_video_frames`).
        A clip with fewer frames than ``num_frames`` is a ValueError; left at None, the count is the
        checkpoint's ``num_video_frames`` where it has one, else 8, and a shorter clip repeats frames,
        as VILA's loader does for its configured count. A model with a video encoder (VILA / NVILA)
        makes them one media item of ``[tokens, hidden]`` rows (its frames pooled where the
        checkpoint says so); otherwise each frame is an image in the prompt. Returns the tokens per
        media item added; a video that could not fit the cache is a ValueError, and nothing is added."""
        path = media.as_path(path, "a video path (str or os.PathLike)")
        encoder = getattr(self.vlm, "video_encoder", None)
        repeat_short = num_frames is None
        if num_frames is None:
            num_frames = getattr(self.vlm, "num_video_frames", 8)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if encoder is not None:
            if self.vlm.video_unsupported:
                raise ValueError(self.vlm.video_unsupported)
            encoder.check_frames(num_frames)  # before any frame is decoded
        frames = media.load_video_frames(path, num_frames, repeat_short)
        label = f"video {path} ({num_frames} frames)"
        if encoder is None:
            return self._add_images(frames, label)
        feats = self._timed(lambda fr: [self.vlm.encode_video(fr)], frames)
        return self._add_media(feats, video=True, label=label)

    def drop_pending_media(self) -> int:
        """Discard the media items added since the last message (not yet sent); returns how many.
        The conversation and its cache are kept. A turn already sent with them and not finished
        raises :class:`tinyq.generate.SupersededError` when resumed (it would record media that are gone)."""
        sent = self._sent_images()
        dropped = len(self._items) - sent
        if dropped:
            del self._items[sent:]
            self._slots = [(pos, k) for pos, k in self._slots if k < sent]
            self.gen.supersede()
        return dropped

    def _timed(self, encode, items) -> List[torch.Tensor]:
        """``encode(items)``, its encoder time in ``last_vision_s`` (Triton compilation and CUDA-graph
        captures, first-use costs, counted apart)."""
        CompileTracker.install()
        tower = self.vlm.vision_tower
        start, captured, t0 = CompileTracker.snapshot(), tower.capture_s, time.perf_counter()
        feats = encode(items)
        if self.vlm.device.type == "cuda":
            torch.cuda.synchronize()
        self.last_vision_compile_s = CompileTracker.since(start).seconds
        # a capture's time includes the compilation of its warm-up runs: count that once
        self.last_vision_capture_s = max(0.0, tower.capture_s - captured - self.last_vision_compile_s)
        self.last_vision_s = time.perf_counter() - t0 - self.last_vision_compile_s - self.last_vision_capture_s
        return feats

    def _add_media(self, feats: List[torch.Tensor], video: bool, label: str,
                   sources: Optional[list] = None) -> List[int]:
        new = [MediaItem(rows, self.last_vision_s / len(feats), video, self._next_serial + k,
                         sources[k] if sources else None, len(feats) == 1) for k, rows in enumerate(feats)]
        self._refuse_if_never_fits(new, label)
        self._items.extend(new)
        self._next_serial += len(new)
        return [f.shape[0] for f in feats]

    def _refuse_if_never_fits(self, new: List[MediaItem], label: str) -> None:
        """ValueError naming ``label`` when ``new`` (media that go in one message) could not be sent
        even with no history: the system prompt, one message of them and one token of text, and the
        answer's first token, over ``max_seq_len``. Such media, kept pending, would make every
        later message fail."""
        head = [m for m in self.messages[:1] if m["role"] == "system"]
        alone = head + [{"role": "user", "content": "?", MEDIA: len(new)}]
        need = len(self._expand(alone, new)[0]) + 1
        if need > self.max_seq_len:
            tokens = sum(item.rows.shape[0] for item in new)
            raise ValueError(f"{label}: {tokens} tokens; one message with only {'it' if len(new) == 1 else 'them'} "
                             f"needs {need} tokens of context (prompt format and the answer's first token "
                             f"included), more than max_seq_len={self.max_seq_len}; nothing was added")

    def warm_up(self) -> WarmupReport:
        """Compile the LLM's prefill/decode kernels and capture the decode graph
        (:func:`tinyq.warmup.warm_up`), and run the vision path on blank images (one alone, two
        together: NVILA's two paths), so the first answer's numbers are not compile times.
        Call it before adding media; the conversation is left empty."""
        if any(m["role"] != "system" for m in self.messages) or self._items:
            raise ValueError("warm_up() runs on an empty session; call reset() first")
        report = warm_up(self.gen, sampling=self.sampling)
        from PIL import Image

        tower = self.vlm.vision_tower
        size = tower.config.image_size
        start, captured, t0 = CompileTracker.snapshot(), tower.capture_s, time.perf_counter()
        graphs = tower.graph_count
        for n in (1, 2):
            self.vlm.encode_images([Image.new("RGB", (size, size))] * n)
        if self.vlm.device.type == "cuda":
            torch.cuda.synchronize()
        compiled = CompileTracker.since(start)
        report.seconds += time.perf_counter() - t0
        report.compile_s += compiled.seconds
        report.kernels += compiled.kernels
        report.capture_s += max(0.0, tower.capture_s - captured - compiled.seconds)
        report.graphs += tower.graph_count - graphs
        return report

    # ------------------------------------------------------------------ prompt

    def reset(self) -> None:
        super().reset()
        self._items, self._slots, self._cached_items = [], [], {}

    def drop_oldest_turns(self, n: int = 1) -> int:
        """As :meth:`ChatSession.drop_oldest_turns`; the dropped turns' media go with them."""
        before = self._sent_images()
        dropped = super().drop_oldest_turns(n)
        gone = before - self._sent_images()
        del self._items[:gone]
        return dropped

    def send(self, text: str, sampling=None):
        """Stream the answer to ``text``, with the pending media placed before it. When the answer
        completes, its user message records how many media items it carried (``message["media"]``);
        a turn that fails or is interrupted records nothing, and its media stay pending.
        ``<image>`` in ``text`` is text, not an image: it is removed, with a warning."""
        check_message(text)
        if IMAGE_MARKER in text:
            warnings.warn(f"{IMAGE_MARKER} in the message is text, not an image, and is removed; add images "
                          "with add_images()", stacklevel=2)
        self._encode_pending_together()
        pending = self.pending_images
        return _MediaTurn(self, super().send(text, sampling), pending)

    def _encode_pending_together(self) -> None:
        """Images added one at a time for the same message are encoded again as one batch when the
        model encodes a lone image differently (NVILA: dynamic S2 alone, one tile each for several),
        so a message's images are encoded alike however they were added. They are not in the cache
        yet, so nothing cached changes."""
        sent = self._sent_images()
        for item in self._items[:sent]:  # sent: their images are no longer needed
            item.source = None
        pending = [item for item in self._items[sent:] if item.source is not None]
        if len(pending) < 2 or getattr(self.vlm, "s2_scales", None) is None:
            return
        if any(item.alone for item in pending):
            feats = self._timed(self.vlm.encode_images, [item.source for item in pending])
            for item, rows in zip(pending, feats):
                item.rows = rows
                item.vision_s += self.last_vision_s / len(pending)
                item.alone = False

    def prompt_ids(self, text: str) -> List[int]:
        """The whole conversation's ids if ``text`` were sent now, the pending media before it;
        records where each item's rows go. ``text`` is checked as :meth:`ChatSession.prompt_ids`
        checks it (not empty, valid text); ``<image>`` in it is removed (:meth:`send`)."""
        check_message(text)
        messages = self.messages + [{"role": "user", "content": text, MEDIA: self.pending_images}]
        ids, slots = self._expand(messages, self._items)
        self._slots = slots
        self._forget_other_items(slots)
        return ids

    def _expand(self, messages: List[Dict], items: Sequence[MediaItem]) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Ids of ``messages`` (each user message's media count before its text) with ``items``'
        placeholders written in, in order; and each item's ``(first position, index in items)``."""
        pieces = self._tokenize_pieces(self._render(messages))
        # a video's rows hold their own framing tokens (the video encoder's): only its positions are placeholders
        placeholders = [[self.vlm.image_token_id] * item.rows.shape[0] if item.video
                        else self.vlm.placeholder_ids(item.rows, self.tokenizer) for item in items]
        ids = expand_images(pieces, placeholders)
        slots, pos = [], len(pieces[0])
        for k, (ph, piece) in enumerate(zip(placeholders, pieces[1:])):
            slots.append((pos, k))
            pos += len(ph) + len(piece)
        return ids, slots

    def _forget_other_items(self, slots) -> None:
        """Cut the cache before the first item whose rows it does not hold at that position. Every
        image's placeholder ids are the same, so the generator's id comparison cannot tell one image
        from another: after ``drop_oldest_turns`` a later image can land where a dropped one was."""
        keep = len(self.gen.cached_ids)
        for pos, k in slots:
            if pos < keep and self._cached_items.get(pos) != self._items[k].serial:
                keep = pos
                break
        if keep < len(self.gen.cached_ids):
            self.gen.truncate(keep)
        self._cached_items = {pos: self._items[k].serial for pos, k in slots}

    def _render(self, messages: List[Dict]) -> str:
        """The model's legacy conversation format if it has one (VILA-1.5), else the chat template
        (the tokenizer's, else the family's) over ``messages``, each user message's media as that
        many markers before its text. A processor-style template (llava-hf's ``chat_template.json``:
        content lists with ``{"type": "image"}`` entries, for which it writes the marker itself) gets
        the messages in that form."""
        if self.vlm.conversation is not None:
            return self.vlm.conversation.render([self._with_markers(m) for m in messages])
        template = getattr(self.tokenizer, "chat_template", None) or self.vlm.chat_template
        if not template:
            raise ValueError("neither the tokenizer nor the model family has a chat template")
        if "'image'" in template or '"image"' in template:
            messages = [_as_parts(m) for m in messages]
        else:
            messages = [self._with_markers(m) for m in messages]
        return self.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                  tokenize=False)

    def _with_markers(self, message: Dict) -> Dict[str, str]:
        """``message`` as the template sees it: one marker (and the model's separator) per media
        item, then its text with any marker written in it removed."""
        marks = (IMAGE_MARKER + self.vlm.image_text_separator) * _media_count(message)
        return {"role": message["role"], "content": marks + _strip_markers(message["content"])}

    def _tokenize_pieces(self, rendered: str) -> List[List[int]]:
        """Token ids of ``rendered`` split at each image marker. When the tokenizer knows the marker
        as one token, the whole text is tokenized once (as the reference processors do) and split
        at that id, so the pieces' boundaries tokenize exactly as in the whole text. A legacy
        conversation format tokenizes piece by piece, special tokens included, as VILA does.
        The BOS a tokenizer adds by default opens the prompt where the template wrote none."""
        tok = self.tokenizer
        if self.vlm.conversation is not None:
            return tokenize_pieces(tok, rendered, IMAGE_MARKER)
        marker = tok.convert_tokens_to_ids(IMAGE_MARKER)
        if marker is not None and marker != tok.unk_token_id and tok.convert_ids_to_tokens(marker) == IMAGE_MARKER:
            pieces, cur = [], []
            for t in tok.encode(rendered, add_special_tokens=False):
                if t == marker:
                    pieces.append(cur)
                    cur = []
                else:
                    cur.append(t)
            pieces.append(cur)
        else:
            pieces = [tok.encode(p, add_special_tokens=False) for p in rendered.split(IMAGE_MARKER)]
        # Templates are tokenized without special tokens, as ChatSession does (Llama-3's and Qwen's write
        # their own or want none); llava-hf's and the Vicuna fallback write no <s>, which LlavaProcessor's
        # tokenizer call adds. The whole conversation is rendered each turn, so this is the one BOS.
        if self._bos is not None and pieces[0][:1] != [self._bos]:
            pieces[0] = [self._bos] + pieces[0]
        return pieces

    # ------------------------------------------------------------------ prefill hook

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """``ids [1, S]`` at positions ``start ..`` -> embeddings with the image rows written in."""
        embeds = self.vlm.llm.model.embed_tokens(ids)
        end = start + ids.shape[1]
        for pos, k in self._slots:
            rows = self._items[k].rows
            lo, hi = max(pos, start), min(pos + rows.shape[0], end)
            if lo < hi:
                embeds[0, lo - start:hi - start] = rows[lo - pos:hi - pos].to(embeds.dtype)
        return embeds


class _MediaTurn(DeltaStream):
    """A :class:`ChatSession` turn that, once its answer completes (the turn has then appended its
    user message and the answer to the history), records on that user message how many media items
    went with it. A turn that fails or is dropped appends nothing, so nothing is recorded."""

    def __init__(self, session: VLMChatSession, turn: DeltaStream, media_items: int):
        self._it = self._run(session, turn, media_items)

    def _run(self, session, turn, media_items):
        yield from turn
        session.messages[-2][MEDIA] = media_items
        self.result = turn.result


def _strip_markers(text: str) -> str:
    """``text`` without any ``<image>`` in it (repeated: removing one may join another, "<im<image>age>")."""
    while IMAGE_MARKER in text:
        text = text.replace(IMAGE_MARKER, "")
    return text


def _media_count(message: Dict) -> int:
    return message.get(MEDIA, 0) if message["role"] == "user" else 0


def _as_parts(message: Dict) -> Dict:
    """A message with ``"media": 2`` -> content ``[{"type": "image"}] * 2 + [{"type": "text", ...}]``."""
    text = _strip_markers(message["content"])
    return {"role": message["role"],
            "content": [{"type": "image"}] * _media_count(message) + [{"type": "text", "text": text}]}


def _default_bos(tokenizer) -> Optional[int]:
    """The BOS id ``tokenizer`` puts before a text by default (a Llama tokenizer's ``<s>``), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return bos if list(tokenizer("x").input_ids[:1]) == [bos] else None


def _as_list(images) -> list:
    """One path or PIL image as a list of one (a str is not a sequence of images); else a list."""
    if isinstance(images, (str, bytes, os.PathLike)) or media.is_image(images):
        return [images]
    try:
        return list(images)
    except TypeError:
        raise TypeError(f"images must be paths or PIL images (or a list of them), "
                        f"got {type(images).__name__}") from None


def _describe_images(images: list) -> str:
    """"image a.jpg", or "3 images (a.jpg, b.jpg, a PIL image)", for error messages."""
    names = [os.fsdecode(im) if isinstance(im, (str, bytes, os.PathLike))
             else getattr(im, "filename", "") or "a PIL image" for im in images]
    return f"image {names[0]}" if len(names) == 1 else f"{len(names)} images ({', '.join(names)})"
