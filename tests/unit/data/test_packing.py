"""The one packer: EOS between documents, remainder dropped, bytes of exactly the kept text."""

import pytest
from tiny_models import tiny_tokenizer

from drpruning.data import pack


def test_packing_concatenates_with_eos_and_drops_remainder():
    tok = tiny_tokenizer()
    seqs = pack(tok, ["ab", "cde"], seq_len=3).sequences
    a, b, c, d, e = (tok.convert_tokens_to_ids(ch) for ch in "abcde")
    eos = tok.eos_token_id
    # stream: a b EOS c d e EOS -> two full sequences, the last token dropped
    assert seqs.tolist() == [[a, b, eos], [c, d, e]]


def test_packing_counts_bytes_of_the_kept_text():
    tok = tiny_tokenizer()  # one token per character; EOS after each document

    def counted(texts, seq_len, max_sequences=None):
        p = pack(tok, texts, seq_len, max_sequences, count_text=True)
        return p.sequences, p.n_bytes, p.n_chars

    seqs, n_bytes, n_chars = counted(["abc", "de"], 4)
    assert seqs.tolist() == [tok.convert_tokens_to_ids(list("abc")) + [tok.eos_token_id]]
    assert (n_bytes, n_chars) == (4, 4)  # "abc" and its separator; "de" is the dropped remainder
    # a multi-byte character (é is <unk> here, one token over 2 bytes); a document cut mid-way
    seqs, n_bytes, n_chars = counted(["a\u00e9bcd"], 4)
    assert seqs.shape == (1, 4) and (n_bytes, n_chars) == (5, 4)  # "aébc"
    seqs, n_bytes, n_chars = counted(["a\u00e9bcd"], 3)
    assert seqs.shape == (2, 3) and (n_bytes, n_chars) == (7, 6)  # the whole document + EOS
    seqs, n_bytes, _ = counted(["abcdefgh"] * 10, 4, max_sequences=2)
    assert seqs.shape == (2, 4) and n_bytes == 8
    with pytest.raises(ValueError, match="seq_len"):
        pack(tok, ["abc"], 1)


def test_max_sequences_gives_the_first_blocks_of_the_whole_packing():
    tok = tiny_tokenizer()
    texts = [f"document {i} " * (i + 1) for i in range(300)]  # more than one tokenizer batch
    whole = pack(tok, texts, 16).sequences
    assert pack(tok, texts, 16, max_sequences=5).sequences.tolist() == whole[:5].tolist()
