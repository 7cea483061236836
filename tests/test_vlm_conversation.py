"""VILA-1.5's legacy conversation formats (tinyq/vlm/conversation.py): prompts written out by hand
from NVlabs/VILA llava/conversation.py (the templates and ``Conversation.get_prompt``), and VILA's
piece-by-piece tokenization (llava/mm_utils.py, ``tokenizer_image_token``)."""
import pytest

from tinyq.vlm.conversation import LEGACY_FORMATS, tokenize_pieces

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")

ONE_TURN = [{"role": "user", "content": "<image>What is it?"}]
TWO_TURNS = ONE_TURN + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Its colour?"}]


def test_vicuna_v1():
    fmt = LEGACY_FORMATS["vicuna_v1"]
    assert fmt.render(ONE_TURN) == VICUNA_SYSTEM + " USER: <image>What is it? ASSISTANT:"
    assert fmt.render(TWO_TURNS) == (VICUNA_SYSTEM + " USER: <image>What is it? ASSISTANT: A cat.</s>"
                                     "USER: Its colour? ASSISTANT:")


def test_hermes_2():
    fmt = LEGACY_FORMATS["hermes-2"]
    head = "<|im_start|>system\nAnswer the questions.<|im_end|>"
    assert fmt.render(ONE_TURN) == head + "<|im_start|>user\n<image>What is it?<|im_end|><|im_start|>assistant\n"
    assert fmt.render(TWO_TURNS) == (head + "<|im_start|>user\n<image>What is it?<|im_end|>"
                                     "<|im_start|>assistant\nA cat.<|im_end|>"
                                     "<|im_start|>user\nIts colour?<|im_end|><|im_start|>assistant\n")


def test_llama_3():
    fmt = LEGACY_FORMATS["llama_3"]
    head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM + "<|eot_id|>"
    user, bot = "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert fmt.render(ONE_TURN) == head + user + "<image>What is it?<|eot_id|>" + bot
    assert fmt.render(TWO_TURNS) == (head + user + "<image>What is it?<|eot_id|>" + bot + "A cat.<|eot_id|>"
                                     + user + "Its colour?<|eot_id|>" + bot)


def test_system_message_replaces_the_default_system_text():
    system = [{"role": "system", "content": "Be brief."}]
    assert LEGACY_FORMATS["vicuna_v1"].render(system + ONE_TURN) == "Be brief. USER: <image>What is it? ASSISTANT:"
    assert LEGACY_FORMATS["hermes-2"].render(system + ONE_TURN).startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize("messages,match", [
    ([{"role": "assistant", "content": "hi"}], "message 0 is from 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is from 'user'"),
    (TWO_TURNS[:2], "the last message must be the user's"),
    ([], "the last message must be the user's"),
])
def test_turns_out_of_order_are_refused(messages, match):
    with pytest.raises(ValueError, match=match):
        LEGACY_FORMATS["vicuna_v1"].render(messages)


def test_pieces_keep_one_bos():
    """Each piece is tokenized with the tokenizer's special tokens; only the first keeps its BOS."""
    from tests.vlm_tiny import vlm_tokenizer

    tok = vlm_tokenizer(llama_bos=True)
    bos = tok.bos_token_id
    plain = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    pieces = tokenize_pieces(tok, "USER: <image><image>What? ASSISTANT:", "<image>")
    assert pieces == [[bos] + plain("USER: "), [], plain("What? ASSISTANT:")]
    # a template that writes its own BOS text gets two, as VILA's llama_3 prompts do
    assert tokenize_pieces(tok, "<s>hi", "<image>") == [[bos, bos] + plain("hi")]
    # a tokenizer without a BOS of its own: nothing dropped
    tok = vlm_tokenizer()
    assert tokenize_pieces(tok, "a<image>b", "<image>") == [plain("a"), plain("b")]
