"""Data: local files and Hub datasets, text packed into blocks (cached), row sources and mixtures, the SFT row
formats and preference rows, chat templates, tokenizers trained from scratch, and the shipped corpus."""

from hfpipe.data.files import load_raw_splits
from hfpipe.data.preference_rows import count_pair_tokens, preference_preparer
from hfpipe.data.sft_rows import prepare_sft_rows
from hfpipe.data.sources import load_splits

__all__ = ["count_pair_tokens", "load_raw_splits", "load_splits", "preference_preparer", "prepare_sft_rows"]
