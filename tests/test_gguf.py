"""GGUF reading: llama.cpp's q/k permutation undone, config and tensors, and the embedded default model."""
import numpy as np
import pytest
import torch

from tests.tiny_models import hf_config
from tinyq.models.gguf import default_model_path, read_gguf, read_gguf_header, unpermute_qk


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (pairs interleaved per head), written from its description."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads, head_dim, cols", [(4, 16, 64), (3, 64, 5), (1, 8, 1)])
def test_unpermute_inverts_llama_cpp_permutation(heads, head_dim, cols):
    w = torch.randn(heads * head_dim, cols)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)
    assert not torch.equal(llama_cpp_permute(w, heads), w) or head_dim == 2


def test_synthetic_gguf_round_trip(tmp_path):
    import gguf
    from transformers import LlamaForCausalLM

    cfg = hf_config("llama", 96)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).float()
    sd = hf.state_dict()
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)  # hf_config("llama") uses the default theta
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf_to_gguf = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                  "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            mod = rest.rsplit(".", 1)[0]
            gname = f"blk.{i}.{hf_to_gguf[mod]}.weight"
            if mod == "self_attn.q_proj":
                t = llama_cpp_permute(t, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                t = llama_cpp_permute(t, cfg.num_key_value_heads)
        else:
            gname = names[name]
        w.add_tensor(gname, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    meta, infos, _ = read_gguf_header(path)
    assert meta["llama.block_count"] == 2 and len(infos) == len(sd)
    config, state, tok = read_gguf(path, tokenizer=False)
    assert tok is None and config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert set(state) == set(sd)
    for name, t in sd.items():
        assert torch.equal(state[name], t), name


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf(str(bad))
    with pytest.raises(FileNotFoundError):
        read_gguf(str(tmp_path / "missing.gguf"))


def test_default_model_answers():
    """The embedded SmolLM2-135M-Instruct, W4A16 g64 on the CPU: a short greedy answer."""
    pytest.importorskip("gguf")
    try:
        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from tinyq.chat import ChatSession
    from tinyq.models import load_model

    model, tok = load_model("default", precision="w4a16", group_size=64, device="cpu", max_seq_len=256)
    assert model.config.hidden_size == 576 and model.config.num_layers == 30 and model.config.tie_word_embeddings
    chat = ChatSession(model, tok, max_new_tokens=12)
    r = chat.ask("What is the capital of France?")
    assert "Paris" in r.text, r.text
