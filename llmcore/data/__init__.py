"""Data: the vendored corpora and the datasets built from them."""

from llmcore.data.collate import (attention_mask_matrix, causal_lm_targets, collate,
                                  pad_sequences)
from llmcore.data.corpora import CorpusError, load_corpus
from llmcore.data.lm import (LMWindows, get_batch, load_token_cache, split_tokens,
                             unigram_loss, write_token_cache)
from llmcore.data.mlm import IGNORE_INDEX, mask_tokens

__all__ = ["CorpusError", "IGNORE_INDEX", "LMWindows", "attention_mask_matrix",
           "causal_lm_targets", "collate", "get_batch",
           "load_corpus", "load_token_cache", "mask_tokens", "pad_sequences",
           "split_tokens", "unigram_loss", "write_token_cache"]
