"""Parameter counts and the per-device memory of a training step, from the model config alone.

The activation terms are what autograd keeps for backward in this code, counted with
`torch.autograd.graph.saved_tensors_hooks` on tiny models (tests/unit/test_plan.py checks the formula
byte for byte). Per decoder layer and token, with d hidden, q = heads x head_dim, kv = KV heads x head_dim,
f the FFN width, H the query heads, w the weight dtype's bytes (the residual stream's) and c the compute
dtype's (bf16 autocast: 2; no autocast: w):

    each RMSNorm     4d + 4 + w d          (its float32 input, 1/rms, the normalised input)
    q/k/v input      c d, or 3 c d         (under autocast each projection keeps its own cast copy)
    attention        c (2q + 2kv) + 4H     (q, k after rotary, v, SDPA output, its float32 logsumexp)
    MLP input        c d, or 2 c d         (gate and up each keep a cast copy under autocast)
    MLP              4 c f                 (gate, up, silu(gate), their product: down's input)

Outside the layers: the token ids (8), the final norm and LM-head input (4d + 4 + w d + c d) per token, and
the rotary cos/sin tables (2 x seq_len x head_dim x w) once per forward. Under autocast every float32 weight
a linear layer reads is also kept as a bf16 copy until the end of the forward (autocast's cast cache; and
for backward), except o_proj / down_proj under the pruning masks, whose function keeps the weight itself.

FSDP with bf16 compute over float32 weights runs no autocast: its MixedPrecisionPolicy gathers each unit's
weights in bf16 (`training.parallel.mixed_precision`), so the forward is a bf16 model's (w = c = 2 above, the
residual stream included) with no weight copies, and the gathered units are counted at 2 bytes, not 4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from drpruning.models.families import family_of
from drpruning.models.shape import Shape

GB = 1e9


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model of one family and shape, by part."""

    embedding: int  # input embedding
    lm_head: int  # 0 when tied to the embedding
    attention: int  # q, k, v, o weights and biases, all layers
    mlp: int  # gate, up, down weights and biases, all layers
    norms: int  # two per layer and the final norm

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.mlp + self.norms


def parameter_counts(config: Any, shape: Shape) -> ParamCounts:
    """Every parameter of `config`'s family at `shape` (a tied embedding once), by part."""
    d, f, hd, L = shape.hidden_size, shape.intermediate_size, shape.head_dim, shape.num_hidden_layers
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    qkv_bias, o_bias, mlp_bias = family_of(config).biases(config)
    attention = d * q + 2 * d * kv + q * d + qkv_bias * (q + 2 * kv) + o_bias * d
    mlp = 3 * d * f + mlp_bias * (2 * f + d)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding = config.vocab_size * d
    return ParamCounts(embedding=embedding, lm_head=0 if tied else embedding, attention=L * attention,
                       mlp=L * mlp, norms=(2 * L + 1) * d)


def sliding_window(config: Any) -> int | None:
    """The attention window when the model uses one (then sequences longer than it need a mask)."""
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2, SmolLM3: off unless asked for
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def layer_token_bytes(config: Any, shape: Shape, w: int, c: int, seq_len: int) -> int:
    """Bytes one decoder layer saves for backward per token (see the module docstring)."""
    d, f, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv, H = shape.num_attention_heads * hd, shape.num_key_value_heads * hd, shape.num_attention_heads
    window = sliding_window(config)
    masked = window is not None and seq_len > window
    # with a mask SDPA gets k and v repeated to every query head (transformers' repeat_kv), and each layer
    # keeps a [seq, seq] mask per sequence in the compute dtype
    kv_saved = q if masked and H != shape.num_key_value_heads else kv
    norm = 4 * d + 4 + w * d
    attn_in = c * d * (1 if c == w else 3)
    mlp_in = c * d * (1 if c == w else 2)
    mask = c * seq_len if masked else 0
    return 2 * norm + attn_in + mlp_in + c * (2 * q + 2 * kv_saved) + 4 * H + 4 * c * f + mask


def base_token_bytes(shape: Shape, w: int, c: int) -> int:
    """Bytes per token saved outside the layers: token ids, final norm, LM-head input."""
    d = shape.hidden_size
    return 8 + 4 * d + 4 + w * d + c * d


def rotary_bytes(shape: Shape, w: int, seq_len: int) -> int:
    """The cos / sin tables of one forward, shared by every layer and sequence."""
    return 2 * seq_len * shape.head_dim * w


def layer_linear_weights(shape: Shape, masked_o: bool = False, masked_down: bool = False) -> int:
    """Weights of one layer's linear maps (what autocast copies), without o_proj / down_proj when masked."""
    d, f, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    return d * q + 2 * d * kv + (0 if masked_o else q * d) + 2 * d * f + (0 if masked_down else f * d)


def saved_bytes(config: Any, shape: Shape, batch: int, seq_len: int, w: int, c: int,
                masked_o: bool = False, masked_down: bool = False) -> int:
    """Everything a model forward of [batch, seq_len] tokens saves for backward, logits excluded: the
    layers, the rest, the rotary tables and (under autocast, c != w) the compute-dtype weight copies."""
    tokens = batch * seq_len
    acts = tokens * (shape.num_hidden_layers * layer_token_bytes(config, shape, w, c, seq_len)
                     + base_token_bytes(shape, w, c)) + rotary_bytes(shape, w, seq_len)
    return acts + (weight_copy_bytes(config, shape, c, masked_o, masked_down) if c != w else 0)


def weight_copy_bytes(config: Any, shape: Shape, c: int, masked_o: bool = False, masked_down: bool = False) -> int:
    """The compute-dtype copies autocast keeps of every linear weight (the LM head's too, tied or not)."""
    layers = shape.num_hidden_layers * layer_linear_weights(shape, masked_o, masked_down)
    return c * (layers + config.vocab_size * shape.hidden_size)


def checkpointed_bytes(config: Any, shape: Shape, batch: int, seq_len: int, w: int, c: int) -> int:
    """With activation checkpointing: each layer keeps only its input (w bytes per hidden unit per token);
    the rest is recomputed layer by layer in backward (`recompute_bytes`)."""
    tokens = batch * seq_len
    return (tokens * (shape.num_hidden_layers * w * shape.hidden_size + base_token_bytes(shape, w, c))
            + rotary_bytes(shape, w, seq_len))


def recompute_bytes(config: Any, shape: Shape, batch: int, seq_len: int, w: int, c: int,
                    masked_o: bool = False, masked_down: bool = False) -> int:
    """One layer's full activations (and its weight copies), live while backward recomputes it."""
    one = Shape(1, shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads,
                shape.intermediate_size, shape.head_dim)
    copies = c * layer_linear_weights(shape, masked_o, masked_down) if c != w else 0
    return batch * seq_len * layer_token_bytes(config, one, w, c, seq_len) + copies


def logits_bytes(vocab: int, batch: int, seq_len: int, c: int, chunk_rows: int) -> int:
    """The [batch x seq_len, vocab] logits in the compute dtype and their gradient, plus the float32
    cross-entropy of one chunk (at most `chunk_rows` tokens of one sequence: its float32 copy and softmax)."""
    return 2 * batch * seq_len * vocab * c + 2 * min(seq_len, chunk_rows) * vocab * 4


def pruner_params(shape: Shape, structures: tuple[str, ...] | list[str], head_mode: str) -> int:
    """Log-alphas of every structure's units, and its two Lagrange multipliers."""
    L, d, f = shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size
    heads = L * (shape.num_key_value_heads if head_mode == "kv_group" else shape.num_attention_heads)
    sizes = {"layer": L, "head": heads, "intermediate": L * f, "hidden": d}
    return sum(sizes[s] + 2 for s in structures)


def pruner_bytes(shape: Shape, structures: tuple[str, ...] | list[str], head_mode: str) -> int:
    """The pruner's parameters (value, gradient, two AdamW moments, float32) and the per-forward expanded
    masks the masked layers keep (head [q], FFN [f], output [d] and two norms [d] per layer) with gradients."""
    L, d, f = shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    expanded = L * (q + f + 3 * d) + d
    return 16 * pruner_params(shape, structures, head_mode) + 2 * 4 * expanded


def fsdp_unsharded_params(shape: Shape, counts: ParamCounts) -> int:
    """Parameters FSDP2 holds gathered at once: the root unit (embeddings, LM head, final norm; not
    resharded between forward and backward) and two decoder layers (the current one and the prefetched).
    Gathered in the policy's param_dtype: bf16 under bf16 compute, else the weights' dtype."""
    per_layer = (counts.attention + counts.mlp) // shape.num_hidden_layers + 2 * shape.hidden_size
    return counts.embedding + counts.lm_head + shape.hidden_size + 2 * per_layer


@contextlib.contextmanager
def saved_storages(exclude: Iterable[Any] = ()) -> Iterator[dict[int, int]]:
    """What autograd saves for backward inside the block, measured: {storage address: bytes}, each storage
    once, those of `exclude` (e.g. the parameters) left out. The measurement the formulas above were fitted to."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen
