import json
import math
import statistics

import pytest
import torch
from tiny_models import VOCAB, save_tiny, tiny_model, tiny_tokenizer

from drpruning.data import pack, read_documents
from drpruning.evaluation import evaluate_model, format_table, resolve_model_dir
from drpruning.evaluation.perplexity import domain_losses, summarize
from drpruning.models import ModelSourceError


def direct_nats(model, seq: torch.Tensor) -> tuple[float, int]:
    """Independent: one forward per prefix, unbatched, the log-probability of the next token."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):
            logits = model(input_ids=seq[None, :t]).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[seq[t]])
    return total, len(seq) - 1


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_domain_losses_equal_per_prefix_loop(kind):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(1)
    seqs = {"a": torch.randint(0, VOCAB, (3, 9), generator=g),
            "b": torch.randint(0, VOCAB, (1, 12), generator=g)}
    got = domain_losses(model, seqs, batch_size=2)  # 3 sequences in batches of 2: a partial batch too
    for name, s in seqs.items():
        nats = [direct_nats(model, row) for row in s]
        tokens = sum(n for _, n in nats)
        loss = sum(v for v, _ in nats) / tokens
        assert got[name]["tokens"] == tokens
        assert got[name]["loss"] == pytest.approx(loss, rel=1e-5)
        assert got[name]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert got[name]["sequence_tokens"] == s.numel()
        means = [v / n for v, n in nats]  # independent: the standard error of the mean over sequences
        if len(means) > 1:
            sd = statistics.stdev(means)
            assert got[name]["stderr"] == pytest.approx(sd / math.sqrt(len(means)), rel=1e-4)
        else:
            assert math.isnan(got[name]["stderr"])


def test_summarize_bits_per_byte_by_hand():
    losses = {"x": {"loss": 2.0, "tokens": 30, "ppl": math.exp(2.0), "sequences": 2, "sequence_tokens": 32},
              "y": {"loss": 3.0, "tokens": 15, "ppl": math.exp(3.0), "sequences": 1, "sequence_tokens": 16}}
    s = summarize(losses, n_bytes={"x": 100, "y": 40}, n_chars={"x": 50, "y": 40})
    # mean nats/token x tokens of the text = total nats; / (ln 2 x bytes)
    assert s["domains"]["x"]["bpb"] == pytest.approx(2.0 * 32 / (math.log(2) * 100))
    assert s["domains"]["y"]["bpb"] == pytest.approx(3.0 * 16 / (math.log(2) * 40))
    assert s["domains"]["x"]["bpc"] == pytest.approx(2.0 * 32 / (math.log(2) * 50))
    assert s["mean_loss"] == pytest.approx(2.5)
    assert s["mean_ppl"] == pytest.approx(math.exp(2.5))
    assert (s["worst_domain"], s["worst_loss"]) == ("y", 3.0)
    assert s["mean_bpb"] == pytest.approx((s["domains"]["x"]["bpb"] + s["domains"]["y"]["bpb"]) / 2)
    with pytest.raises(ValueError, match="positive"):
        summarize(losses, n_bytes={"x": 0})


def test_evaluate_model_on_a_run_dir(tmp_path):
    save_tiny(tmp_path / "run" / "model")
    text = tmp_path / "d.txt"
    text.write_text("\n".join(f"line number {i} of some text" for i in range(20)))
    res = evaluate_model(tmp_path / "run", data={"d": text}, seq_len=16, max_sequences=3, batch_size=2,
                         device="cpu")
    model, tok = tiny_model(), tiny_tokenizer()
    packed = pack(tok, read_documents(text), 16, 3, count_text=True)
    seqs, n_bytes = packed.sequences, packed.n_bytes
    nats = [direct_nats(model, row) for row in seqs]
    loss = sum(v for v, _ in nats) / sum(n for _, n in nats)
    d = res["perplexity"]["domains"]["d"]
    assert d["loss"] == pytest.approx(loss, rel=1e-5)
    assert d["bpb"] == pytest.approx(loss * seqs.numel() / (math.log(2) * n_bytes), rel=1e-5)
    json.dumps(res)  # JSON-able
    table = format_table(res)
    assert "worst domain: d" in table and f"{d['loss']:.4f}" in table
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_dir(tmp_path)
