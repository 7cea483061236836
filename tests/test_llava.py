"""tinyq LLaVA vs transformers LlavaForConditionalGeneration (fp32, random tiny checkpoints):
logits with 1 and 2 images, 16 greedy tokens through the chat session, follow-up turns, errors."""
import re

import pytest
import torch

from tests.vlm_tiny import IMAGE_SIZE, PATCH, halve_columns, make_llava_dir
from tinyq.models.llava import load_llava
from tinyq.vlm import media
from tinyq.vlm.session import VLMChatSession

TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2


@pytest.fixture(scope="module", params=[("clip", "llama", False), ("siglip", "qwen2", True)],
                ids=["clip-llama-new-keys", "siglip-qwen2-legacy-keys"])
def llava(request, tmp_path_factory):
    tower, llm, legacy = request.param
    path = tmp_path_factory.mktemp(f"llava-{tower}")
    hf, _ = make_llava_dir(path, tower, llm, legacy)
    model, tok = load_llava(str(path), precision="fp32", device="cpu", max_seq_len=256)
    return hf, model, tok


def _images(n, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    sizes = [(40, 30), (25, 33), (28, 28)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes[:n]]


def _pixels(model, images):
    return media.pixel_values(model.processor, [media.expand_to_square(im, model.pad_color) for im in images])


def _hf_greedy(hf, ids, px, n):
    ids, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(input_ids=ids, pixel_values=px).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_match_transformers(llava, n_images):
    hf, model, tok = llava
    img = model.image_token_id
    ids = [5, 6, 7]
    for _ in range(n_images):
        ids += [img] * TOKENS_PER_IMAGE + [10, 11]
    ids = torch.tensor([ids])
    px = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
    ours = model.logits(ids, features=list(model.encode_pixels(px)))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_feature_layers_listed_are_concatenated_as_transformers_does(tmp_path, tower):
    """``vision_feature_layer`` as a list: the hidden states of those layers side by side on channels,
    the projector sized for them; logits and 16 greedy tokens as transformers gives them."""
    hf, _ = make_llava_dir(tmp_path, tower, "llama", feature_layer=[-3, -1])
    model, tok = load_llava(str(tmp_path), precision="fp32", device="cpu", max_seq_len=256)
    assert model.multi_modal_projector.linear_1.in_features == 2 * hf.config.vision_config.hidden_size
    ids = torch.tensor([[5, 6] + [model.image_token_id] * TOKENS_PER_IMAGE + [10, 11]])
    px = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
    torch.testing.assert_close(model.logits(ids, features=list(model.encode_pixels(px))), ref, rtol=1e-4, atol=1e-4)
    s = VLMChatSession(model, tok, max_seq_len=256, temperature=0, max_new_tokens=16)
    s.gen.eos_ids = set()
    images = _images(1)
    s.add_images(images)
    res = s.ask("what is this?")
    prompt = s.gen.cached_ids[:res.stats.prompt_tokens]
    assert res.token_ids == _hf_greedy(hf, prompt, _pixels(model, images), 16)


@pytest.mark.parametrize("n_images", [1, 2])
def test_greedy_session_matches_transformers(llava, n_images):
    hf, model, tok = llava
    s = VLMChatSession(model, tok, max_seq_len=256, temperature=0, max_new_tokens=16)
    s.gen.eos_ids = set()  # 16 tokens whatever they are
    images = _images(n_images)
    assert s.add_images(images) == [TOKENS_PER_IMAGE] * n_images
    res = s.ask("what is this?")
    prompt = s.gen.cached_ids[:res.stats.prompt_tokens]
    assert prompt.count(model.image_token_id) == n_images * TOKENS_PER_IMAGE
    assert res.token_ids == _hf_greedy(hf, prompt, _pixels(model, images), 16)


def test_follow_up_turns_prefill_only_new_text_and_encode_only_new_images(llava, monkeypatch):
    hf, model, tok = llava
    s = VLMChatSession(model, tok, max_seq_len=256, temperature=0, max_new_tokens=4)
    s.gen.eos_ids = set()
    encoded = []
    real = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda ims: encoded.append(len(ims)) or real(ims))
    first, second = _images(2)
    s.add_images([first])
    r1 = s.ask("first?")
    r2 = s.ask("and again?")  # text only: prefills the new turn only
    # turn 1's prompt (with its image) stays cached: at most the answer (re-tokenized) and the new turn
    assert r2.stats.prefilled_tokens <= r2.stats.prompt_tokens - r1.stats.prompt_tokens
    s.add_images([second])  # a new image mid-conversation: only it is encoded
    r3 = s.ask("now this one?")
    assert encoded == [1, 1]
    assert TOKENS_PER_IMAGE < r3.stats.prefilled_tokens <= r3.stats.prompt_tokens - r2.stats.prompt_tokens
    prompt = s.gen.cached_ids[:r3.stats.prompt_tokens]
    assert prompt.count(model.image_token_id) == 2 * TOKENS_PER_IMAGE
    assert r3.token_ids == _hf_greedy(hf, prompt, _pixels(model, [first, second]), 4)


def test_bad_input(llava, tmp_path):
    hf, model, tok = llava
    s = VLMChatSession(model, tok, max_seq_len=256, max_new_tokens=2)
    with pytest.raises(ValueError, match="no images given"):
        s.add_images([])
    with pytest.raises(TypeError, match="images must be paths or PIL images .*got int"):
        s.add_images(42)
    with pytest.raises(TypeError, match=r"expected an image path \(str or os.PathLike\) or a PIL image, got float"):
        s.add_images([1.5])
    with pytest.raises(ValueError, match="image not found"):
        s.add_images([str(tmp_path / "missing.jpg")])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        s.add_images([str(bad)])
    assert s.images == [] and s.messages == []
    ids = torch.tensor([[5] + [model.image_token_id] * 3])
    with pytest.raises(ValueError, match="3 image-token positions"):
        model.logits(ids, features=list(model.encode_pixels(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))))


def test_projector_of_the_wrong_shape_names_the_tensor_and_its_file(tmp_path):
    """A projector tensor whose shape the configs do not give is a one-line ValueError naming the tensor
    and the file holding it (what examples/chat_vlm.py prints), not load_state_dict's RuntimeError."""
    make_llava_dir(tmp_path, "clip", "llama")
    file = tmp_path / "model.safetensors"
    name = "model.multi_modal_projector.linear_2.weight"
    rows, cols = halve_columns(file, name)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(file))}: tensor '{name}' has shape \({rows}, {cols // 2}\), "
                                         rf"expected \({rows}, {cols}\) from the sizes in config.json$"):
        load_llava(str(tmp_path), precision="fp32", device="cpu", max_seq_len=64)


def test_w4a16_llm_loads_quantized(tmp_path):
    from tinyq.nn.w4a16_linear import W4A16Linear

    path = tmp_path / "w4"
    make_llava_dir(path, "clip", "llama")
    q, _ = load_llava(str(path), precision="w4a16", group_size=32, device="cpu")
    assert isinstance(q.llm.model.layers[0].self_attn.qkv_proj, W4A16Linear)
    ids = torch.tensor([[5] + [q.image_token_id] * TOKENS_PER_IMAGE + [6]])
    px = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    ref, _ = load_llava(str(path), precision="fp32", device="cpu")
    a = q.logits(ids, features=list(q.encode_pixels(px))).flatten()
    b = ref.logits(ids, features=list(ref.encode_pixels(px))).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98


@pytest.mark.parametrize("legacy", [False, True])
def test_awq_llm_loads_like_rtn_at_load(tmp_path, legacy):
    """A llava-hf folder whose language model is stored in AutoAWQ's format (qweight / qzeros / scales,
    with a quantization_config), under the new key names and the legacy ones, reads as W4A16 and gives
    the logits of RTN at load from the float folder."""
    import json
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    from tinyq.nn.w4a16_linear import W4A16Linear
    from tinyq.quant.checkpoint import quantization_config, quantized_state_dict

    fp, awq = tmp_path / "fp", tmp_path / "awq"
    hf, _ = make_llava_dir(fp, "clip", "llama", legacy=legacy)
    # the language model alone, as a causal LM, quantized by tinyq's AutoAWQ writer
    text = transformers.LlamaForCausalLM(hf.config.text_config).eval()
    text.load_state_dict({("model." + k[len("model.language_model."):]) if k.startswith("model.language_model.") else k: v
                          for k, v in hf.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))})
    body, head = ("language_model.model.", "language_model.lm_head.") if legacy else ("model.language_model.", "lm_head.")
    quantized = {(body + k[len("model."):]) if k.startswith("model.") else (head + k[len("lm_head."):]): v.contiguous()
                 for k, v in quantized_state_dict(text, 32, "awq", torch.float16).items()}
    shutil.copytree(fp, awq)
    tensors = {k: v for k, v in load_file(fp / "model.safetensors").items() if not k.startswith((body, head))}
    save_file({**tensors, **quantized}, awq / "model.safetensors")
    config = json.loads((fp / "config.json").read_text())
    config["quantization_config"] = quantization_config(32, "awq")
    (awq / "config.json").write_text(json.dumps(config))

    rtn, _ = load_llava(str(fp), precision="w4a16", group_size=32, device="cpu")
    ckpt, _ = load_llava(str(awq), precision="w4a16", device="cpu")
    assert isinstance(ckpt.llm.model.layers[0].self_attn.qkv_proj, W4A16Linear)
    ids = torch.tensor([[5] + [ckpt.image_token_id] * TOKENS_PER_IMAGE + [6]])
    px = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(ckpt.logits(ids, features=list(ckpt.encode_pixels(px))),
                               rtn.logits(ids, features=list(rtn.encode_pixels(px))), rtol=2e-3, atol=2e-3)


LLAVA_HF_TEMPLATE = (  # the shape of llava-hf's processor template: content lists, the template writes <image>
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize("template,starts", [(LLAVA_HF_TEMPLATE, "USER: \n\nhi ASSISTANT:"),
                                             (None, "A chat between a curious human")])
def test_processor_template_and_vicuna_fallback(llava, template, starts):
    hf, model, tok = llava
    saved = tok.chat_template
    tok.chat_template = template
    try:
        s = VLMChatSession(model, tok, max_seq_len=256)
        s.add_images(_images(2))
        ids = s.prompt_ids("hi")
    finally:
        tok.chat_template = saved
    assert ids.count(model.image_token_id) == 2 * TOKENS_PER_IMAGE
    assert [p for p, _ in s._slots] == [i for i, t in enumerate(ids) if t == model.image_token_id][::TOKENS_PER_IMAGE]
    text = tok.decode([t for t in ids if t != model.image_token_id])
    assert text.startswith(starts) and text.rstrip().endswith("ASSISTANT:")


def test_processor_chat_template_file_is_read(tmp_path):
    """llava-hf folders ship the processor's template as chat_template.json, which the tokenizer does
    not load: the loader does, and the prompt follows it (over the tokenizer's own, as transformers'
    processor does); a broken file is an error naming it."""
    import json

    make_llava_dir(tmp_path, "clip", "llama")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
    model, tok = load_llava(str(tmp_path), precision="fp32", device="cpu", max_seq_len=256)
    assert tok.chat_template == LLAVA_HF_TEMPLATE
    s = VLMChatSession(model, tok, max_seq_len=256)
    s.add_images(_images(1))
    text = tok.decode([t for t in s.prompt_ids("hi") if t != model.image_token_id])
    assert text.startswith("USER: \nhi ASSISTANT:")
    (tmp_path / "chat_template.json").write_text("{not json")
    with pytest.raises(ValueError, match="chat_template.json: not valid JSON"):
        load_llava(str(tmp_path), precision="fp32", device="cpu", max_seq_len=256)
    (tmp_path / "chat_template.json").write_text(json.dumps({"template": LLAVA_HF_TEMPLATE}))
    with pytest.raises(ValueError, match="chat_template.json: not a chat template file"):
        load_llava(str(tmp_path), precision="fp32", device="cpu", max_seq_len=256)


def test_a_video_is_its_frames_as_images(llava, tmp_path):
    """LLaVA has no video encoder: each sampled frame is one image in the prompt, and the answer is
    transformers' for those frames given as images."""
    from PIL import Image

    hf, model, tok = llava
    g = torch.Generator().manual_seed(3)
    frames = [Image.fromarray((torch.rand(24, 36, 3, generator=g) * 255).byte().numpy()) for _ in range(5)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    s = VLMChatSession(model, tok, max_seq_len=512, temperature=0, max_new_tokens=8)
    s.gen.eos_ids = set()
    assert s.add_video(str(gif), 3) == [TOKENS_PER_IMAGE] * 3
    picked = media.load_video_frames(str(gif), 3)  # frames 0, 2, 4 as the GIF decodes them
    for got, want in zip(s.images, model.encode_images(picked)):
        torch.testing.assert_close(got, want)
    res = s.ask("what happens?")
    prompt = s.gen.cached_ids[:res.stats.prompt_tokens]
    assert prompt.count(model.image_token_id) == 3 * TOKENS_PER_IMAGE
    assert res.token_ids == _hf_greedy(hf, prompt, _pixels(model, picked), 8)


def test_dropping_a_turn_drops_its_images(llava):
    hf, model, tok = llava
    s = VLMChatSession(model, tok, max_seq_len=256, temperature=0, max_new_tokens=2)
    s.gen.eos_ids = set()
    first, second, third = _images(3)
    s.add_images([first])
    s.ask("one")
    s.add_images([second])
    s.ask("two")
    kept = s.images[1]
    s.add_images([third])  # pending: stays for the next message
    assert s.drop_oldest_turns(1) == 1
    assert len(s.images) == 2 and s.images[0] is kept and s.pending_images == 1
    r = s.ask("three")
    prompt = s.gen.cached_ids[:r.stats.prompt_tokens]
    # the cache held the dropped image's rows where the kept one now goes (same placeholder ids):
    # they are prefilled again, not reused
    assert r.stats.prompt_tokens - r.stats.prefilled_tokens <= prompt.index(model.image_token_id)
    assert r.token_ids == _hf_greedy(hf, prompt, _pixels(model, [second, third]), 2)


@pytest.fixture(scope="module")
def llava_bos(tmp_path_factory):
    """A llava-hf folder whose tokenizer puts <s> before a text, as llava-1.5-7b-hf's Llama tokenizer does."""
    import tests.vlm_tiny as vlm_tiny

    path = tmp_path_factory.mktemp("llava-bos")
    plain = vlm_tiny.vlm_tokenizer
    vlm_tiny.vlm_tokenizer = lambda llama_bos=False: plain(llama_bos=True)
    try:
        hf, _ = make_llava_dir(path, "clip", "llama")
    finally:
        vlm_tiny.vlm_tokenizer = plain
    model, tok = load_llava(str(path), precision="fp32", device="cpu", max_seq_len=256)
    return hf, model, tok


def _processor_inputs(model, tok, template, conversation, image):
    """transformers' LlavaProcessor on ``conversation`` (the published usage): the prompt rendered by
    ``template``, then tokenized by the tokenizer with its defaults (so with its BOS), <image> expanded."""
    from transformers import LlavaProcessor

    proc = LlavaProcessor(image_processor=model.processor, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)
    prompt = proc.apply_chat_template(conversation, add_generation_prompt=True)
    return proc(images=image, text=prompt, return_tensors="pt")


@pytest.mark.parametrize("template", ["llava-hf", "vicuna-fallback"])
def test_bos_opens_the_prompt_once_as_in_transformers(llava_bos, template):
    """A tokenizer that adds BOS: the session's prompt is LlavaProcessor's, BOS first, token for token,
    and 6 greedy tokens follow LlavaForConditionalGeneration's; the second turn's prompt (prefilled over
    the cached first) is the processor's for the two turns, still with one BOS."""
    from tinyq.models.llava import VICUNA_TEMPLATE

    hf, model, tok = llava_bos
    template = LLAVA_HF_TEMPLATE if template == "llava-hf" else VICUNA_TEMPLATE
    image = _images(3)[2]  # square: LLaVA's pad-to-square leaves it as the processor sees it
    saved, tok.chat_template = tok.chat_template, template
    try:
        s = VLMChatSession(model, tok, max_seq_len=256, temperature=0, max_new_tokens=6)
        s.gen.eos_ids = set()
        s.add_images([image])
        first = s.ask("what is this?")
        second = s.ask("and then?")
    finally:
        tok.chat_template = saved
    as_parts = template == LLAVA_HF_TEMPLATE
    text = lambda t: [{"type": "text", "text": t}] if as_parts else t  # noqa: E731
    turn1 = [{"role": "user", "content": [{"type": "image"}] + text("what is this?") if as_parts
              else "<image>\nwhat is this?"}]
    ref1 = _processor_inputs(model, tok, template, turn1, image)
    ids1 = ref1.input_ids[0].tolist()
    assert ids1[0] == tok.bos_token_id
    assert s.gen.cached_ids[:first.stats.prompt_tokens] == ids1
    assert first.token_ids == _hf_greedy(hf, ids1, ref1.pixel_values, 6)
    turn2 = turn1 + [{"role": "assistant", "content": text(first.text)}, {"role": "user", "content": text("and then?")}]
    ref2 = _processor_inputs(model, tok, template, turn2, image)
    ids2 = ref2.input_ids[0].tolist()
    prompt2 = s.gen.cached_ids[:second.stats.prompt_tokens]
    assert prompt2 == ids2 and prompt2.count(tok.bos_token_id) == 1
    assert second.stats.prefilled_tokens < second.stats.prompt_tokens - TOKENS_PER_IMAGE  # the first turn stayed cached
    assert second.token_ids == _hf_greedy(hf, ids2, ref2.pixel_values, 6)


def test_tokenizer_without_bos_gets_none(llava):
    hf, model, tok = llava
    s = VLMChatSession(model, tok, max_seq_len=256)
    s.add_images(_images(1))
    assert tok.bos_token_id is None or tok.bos_token_id not in s.prompt_ids("hi")
