"""Data: local files and Hub datasets, text packed into blocks (cached), row sources and mixtures, the SFT row
formats and preference rows, chat templates, tokenizers trained from scratch, and the shipped corpus."""

from hfpipe.data.files import load_raw_splits
from hfpipe.data.sft_rows import prepare_sft_rows
from hfpipe.data.sources import load_splits

__all__ = ["load_raw_splits", "load_splits", "prepare_sft_rows"]
