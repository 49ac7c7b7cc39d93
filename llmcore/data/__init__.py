"""Data: the vendored corpora and the datasets built from them."""

from llmcore.data.corpora import CorpusError, load_corpus

__all__ = ["CorpusError", "load_corpus"]
