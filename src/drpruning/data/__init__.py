"""Data: one document reader (`documents`), one packer (`packing`), domains with a held-out split (`corpus`),
the embedded default corpus (`embedded`), the mixture sampler (`sampler`), initial proportions."""

from drpruning.data.corpus import Corpus, check_sources, load_corpus, split_documents, tokenizer_fingerprint
from drpruning.data.documents import SUFFIXES, DataError, read_documents
from drpruning.data.packing import Packed, pack
from drpruning.data.proportions import initial_proportions, temperature_proportions
from drpruning.data.sampler import MixtureSampler

__all__ = ["Corpus", "check_sources", "load_corpus", "split_documents", "tokenizer_fingerprint", "SUFFIXES",
           "DataError", "read_documents", "Packed", "pack", "initial_proportions", "temperature_proportions",
           "MixtureSampler"]
