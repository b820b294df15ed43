"""Tiny randomly initialised causal LMs for tests: Llama (GQA), Qwen2 (q/k/v biases), Mistral, tied embeddings."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    SmolLM3Config,
)

VOCAB = 128


def _common(**kw) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(kw)
    return base


def llama_config(**kw) -> PretrainedConfig:
    return LlamaConfig(**_common(**kw))


def tied_config(**kw) -> PretrainedConfig:
    """SmolLM2-like: Llama with tied embeddings and 3 query heads per KV head."""
    return LlamaConfig(**_common(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                 tie_word_embeddings=True, **kw))


def qwen2_config(**kw) -> PretrainedConfig:
    # Qwen2 always has q/k/v biases; head_dim * heads (40) != hidden (32) exercises explicit head_dim.
    return Qwen2Config(**_common(hidden_size=32, head_dim=10, tie_word_embeddings=False, **kw))


def mistral_config(**kw) -> PretrainedConfig:
    return MistralConfig(**_common(sliding_window=64, **kw))


def smollm3_config(**kw) -> PretrainedConfig:
    # 4 layers: the last one has no rotary embedding (no_rope_layers [1, 1, 1, 0]), a per-layer list to slice
    return SmolLM3Config(**_common(num_hidden_layers=4, **kw))


# one tiny config per supported family (plus a tied-embedding Llama); tests parametrised over families use it
CONFIGS = {"llama": llama_config, "tied": tied_config, "qwen2": qwen2_config, "mistral": mistral_config,
           "smollm3": smollm3_config}


def tiny_model(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """A randomly initialised tiny model; biases and norm weights are randomised too so that folding is tested."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](**kw), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII and newline; anything else is <unk>), vocab < VOCAB."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def save_tiny(path, kind: str = "llama", seed: int = 0, **kw):
    """A tiny model and tokenizer saved as a Hugging Face folder (what users pass as model.source)."""
    model = tiny_model(kind, seed=seed, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
