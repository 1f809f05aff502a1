"""Tokenizers for the from-scratch path: byte-level BPE or character-level, trained on the corpus."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
# Byte-level BPE needs the 256 byte symbols plus the end-of-text token.
MIN_BPE_VOCAB = 257


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a GPT-2 style byte-level BPE tokenizer: any text round-trips, no unknown tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return _wrap(tokenizer)


def train_char(texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """Build a character-level tokenizer over every character of the corpus (others map to <unk>)."""
    characters: set[str] = set()
    for text in texts:
        characters.update(text)
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1}
    vocab.update({char: index for index, char in enumerate(sorted(characters), start=len(vocab))})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # One pre-token per character, newlines included; Fuse joins them back without spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer, unk_token=UNK_TOKEN)


def _wrap(tokenizer: Tokenizer, unk_token: str | None = None) -> PreTrainedTokenizerBase:
    # eos doubles as bos and pad: a decoder-only LM needs no separate tokens for them.
    kwargs = {"unk_token": unk_token} if unk_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN, **kwargs
    )
