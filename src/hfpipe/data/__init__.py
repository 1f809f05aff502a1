"""Data: local files and Hub datasets, text packed into blocks (cached), row sources and mixtures, the SFT row
formats, preference rows and KTO's rows, chat templates, tokenizers trained from scratch, and the shipped corpus."""

from hfpipe.data.files import load_raw_splits
from hfpipe.data.kto_rows import count_kto_tokens, held_out_pairs, kto_preparer, kto_splits
from hfpipe.data.preference_rows import count_pair_tokens, preference_preparer
from hfpipe.data.prompt_rows import count_prompt_tokens, prompt_preparer
from hfpipe.data.sft_rows import prepare_sft_rows
from hfpipe.data.sources import load_splits

__all__ = [
    "count_kto_tokens",
    "count_pair_tokens",
    "count_prompt_tokens",
    "held_out_pairs",
    "kto_preparer",
    "kto_splits",
    "load_raw_splits",
    "load_splits",
    "preference_preparer",
    "prepare_sft_rows",
    "prompt_preparer",
]
