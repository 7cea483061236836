"""VLMChatSession's bookkeeping on the random tiny NVILA (CPU): which media go with which message
(recorded per message, never read back from the text), media that cannot fit, pending media
dropped, message validation, and the input forms add_images / add_video take."""
import gc
import warnings

import pytest
import torch

from tinyq.chat import ChatSession
from tinyq.generate import ContextOverflowError, SupersededError
from tinyq.vlm.session import VLMChatSession
from tinyq.vlm.tiny import random_tiny_nvila


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_nvila()


def _session(tiny, max_seq_len=1024, max_new_tokens=3):
    model, tok = tiny
    s = VLMChatSession(model, tok, max_seq_len=max_seq_len, temperature=0, max_new_tokens=max_new_tokens)
    s.gen.eos_ids = set()  # answers of exactly max_new_tokens tokens, whatever they are
    return s


def _image(w=70, h=50, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def _gif(path, n):
    frames = [_image(40, 40, seed=i) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40)
    return path


def _image_tokens(s, res):
    return s.gen.cached_ids[:res.stats.prompt_tokens].count(s.vlm.image_token_id)


class _Say:
    """Makes the LLM answer ``text`` (greedy), written in byte tokens as a model writes it, not as the
    ``<image>`` special token: a forward hook on the LM head."""

    def __init__(self, model, tok, text):
        from tokenizers import pre_tokenizers

        chars = "".join(seg for seg, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text))
        self.ids = [tok.convert_tokens_to_ids(c) for c in chars] + [tok.eos_token_id]
        self.handle = model.llm.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, out):
        if self.ids:
            out = out.clone()
            out[..., self.ids.pop(0)] += 1e4
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_image_written_in_text_is_text_not_an_image(tiny):
    """"<image>" in a user message or an answer is removed before rendering (VILA's extract_media
    removes it too): no placeholder comes of it, later turns go on, and an image added later goes
    before its own message's text, not where the old answer wrote the tag."""
    model, tok = tiny
    s = _session(tiny, max_new_tokens=64)
    s.gen.eos_ids = {tok.eos_token_id}  # the forced answer ends with it
    with pytest.warns(UserWarning, match="<image> in the message is text"), _Say(model, tok, "A tag."):
        r = s.ask("What does the <image> tag mean?")
    assert _image_tokens(s, r) == 0
    assert s.messages[0] == {"role": "user", "content": "What does the <image> tag mean?", "media": 0}
    rows = s.add_images([_image()])[0]
    answer = "In LLaVA prompts, <image> marks the picture."
    with _Say(model, tok, answer):
        r = s.ask("what is this, and how is the tag written?")
    s.gen.eos_ids, s.sampling.max_new_tokens = set(), 3
    assert r.text == answer and s.pending_images == 0 and _image_tokens(s, r) == rows
    r = s.ask("thanks")  # the answer's tag is not an image: the turn renders and runs
    assert _image_tokens(s, r) == rows and s.pending_images == 0
    second = s.add_images([_image(50, 70, seed=1)])[0]
    assert s.pending_images == 1
    r = s.ask("and this one?")
    prompt = s.gen.cached_ids[:r.stats.prompt_tokens]
    assert prompt.count(model.image_token_id) == rows + second
    slot = s._slots[1][0]
    before = tok.decode(prompt[:slot])
    assert before.endswith("<|im_start|>user\n") and before.count("<|im_start|>user") == 4  # the 4th message
    assert "In LLaVA prompts,  marks the picture." in before  # the answer, its tag removed


def test_media_records_survive_failed_turns_and_dropped_turns(tiny):
    """A turn that fails, or is dropped unfinished, records nothing: its image stays pending and
    goes with the next message. Dropping the oldest turns drops the media their records name."""
    model, tok = tiny
    s = _session(tiny)
    a, b, c = _image(seed=0), _image(seed=1), _image(seed=2)
    rows_a = s.add_images([a])[0]

    def fail(module, inputs, out):
        raise RuntimeError("boom")

    handle = model.llm.lm_head.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            s.ask("first")
    finally:
        handle.remove()
    assert s.messages == [] and s.pending_images == 1 and s.gen.cached_ids == []
    turn = s.send("first")
    next(turn)  # the prefill ran, one token out: then the turn is dropped
    del turn
    gc.collect()
    assert s.messages == [] and s.pending_images == 1
    r = s.ask("first")
    assert _image_tokens(s, r) == rows_a and s.messages[0]["media"] == 1 and s.pending_images == 0
    fresh = _session(tiny)
    fresh.add_images([a])
    assert r.token_ids == fresh.ask("first").token_ids
    rows_b = s.add_images([b])[0]
    with pytest.warns(UserWarning):
        s.ask("second, with the text <image> in it")
    s.messages[-1]["content"] += " <image> <image>"  # an answer that wrote the tag twice
    rows_c = s.add_images([c])[0]
    assert s.drop_oldest_turns(1) == 1
    assert [m.get("media") for m in s.messages] == [1, None] and s.pending_images == 1
    assert [im.shape[0] for im in s.images] == [rows_b, rows_c]
    r = s.ask("third")
    assert _image_tokens(s, r) == rows_b + rows_c and [m.get("media") for m in s.messages] == [1, None, 1, None]


def test_media_that_can_never_fit_are_refused_whole(tiny, tmp_path):
    """Media whose tokens could not fit max_seq_len even in a conversation of their own are refused
    when added, naming them and the counts, and nothing is added; the session goes on. The count
    is exact: at that many tokens of context they fit and are answered."""
    import re

    gif = str(_gif(tmp_path / "clip.gif", 32))
    s = _session(tiny, max_seq_len=200)
    with pytest.raises(ValueError, match=rf"video {re.escape(gif)} \(32 frames\): \d+ tokens; one message with "
                                         r"only it needs \d+ tokens of context .* more than max_seq_len=200; "
                                         "nothing was added") as err:
        s.add_video(gif, 32)
    assert s.images == [] and s.pending_images == 0
    assert len(s.ask("hi").token_ids) == 3
    need = int(re.search(r"needs (\d+) tokens", str(err.value)).group(1))
    fits = _session(tiny, max_seq_len=need, max_new_tokens=1)
    fits.add_video(gif, 32)
    assert len(fits.ask("?").token_ids) == 1
    with pytest.raises(ValueError, match=r"2 images \(a PIL image, a PIL image\): \d+ tokens; one message with "
                                         "only them needs"):
        _session(tiny, max_seq_len=60).add_images([_image(), _image()])


def test_pending_media_can_be_dropped(tiny):
    """Media that fit alone but not with the history: the message is refused (ContextOverflowError,
    nothing changes); drop_pending_media discards them and the conversation goes on."""
    s = _session(tiny, max_seq_len=250)
    s.add_images([_image()])
    first = s.ask("x")
    s.add_images([_image(seed=1)])
    long = "y" * 100
    with pytest.raises(ContextOverflowError):
        s.send(long)
    assert s.turns == 1 and s.pending_images == 1
    assert s.drop_pending_media() == 1 and s.drop_pending_media() == 0
    assert s.pending_images == 0 and len(s.images) == 1
    r = s.ask(long)
    assert _image_tokens(s, r) == _image_tokens(s, first) and s.messages[-2]["media"] == 0
    # a turn sent with media that are then dropped commits nothing (it would record media that are gone)
    s = _session(tiny)
    s.add_images([_image(seed=2)])
    turn = s.send("z")
    s.drop_pending_media()
    with pytest.raises(SupersededError):
        turn.text()
    assert s.turns == 0 and s.pending_images == 0 and s.images == []


def test_text_that_is_not_valid_is_refused_as_chat_session_refuses_it(tiny):
    """A lone surrogate (what input() gives for bytes that are not UTF-8): the ValueError of
    ChatSession.prompt_ids, not the tokenizer's TypeError; nothing is lost."""
    model, tok = tiny
    text = "caf\udce9?"
    with pytest.raises(ValueError) as plain:
        ChatSession(model.llm, tok, max_seq_len=256, max_new_tokens=2).send(text)
    s = _session(tiny)
    s.add_images([_image()])
    s.ask("hello")
    s.add_images([_image(seed=1)])
    with pytest.raises(ValueError) as vlm:
        s.send(text)
    assert str(vlm.value) == str(plain.value) == "the message is not valid text (surrogates not allowed at character 3)"
    assert s.turns == 1 and s.pending_images == 1
    with pytest.raises(ValueError, match="empty message"):
        s.prompt_ids("  ")


def test_one_path_or_image_is_not_a_sequence_of_them(tiny, tmp_path):
    """A lone str / os.PathLike / PIL image is one image (a str is not iterated by character); a
    video path may be os.PathLike."""
    from PIL import Image

    path = tmp_path / "a.png"
    _image().save(path)
    s = _session(tiny)
    assert s.add_images(str(path)) == [48] and s.add_images(path) == [48]
    with Image.open(path) as im:
        assert s.add_images(im) == [48]
    assert s.add_video(_gif(tmp_path / "clip.gif", 4), 4) == [s.images[-1].shape[0]]
    assert s.pending_images == 4
    with pytest.raises(ValueError, match=f"image not found: {tmp_path / 'missing.png'}$"):
        s.add_images(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match=r"expected a video path \(str or os.PathLike\), got int"):
        s.add_video(42)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no marker in the text: no warning
        assert len(s.ask("compare").token_ids) == 3
