"""A byte-level BPE tokenizer as GGUF metadata (llama.cpp's `gpt2` tokenizer model): tokens, token types, merges,
special token ids, whether BOS/EOS are added, and the chat template, laid out as llama.cpp's convert_hf_to_gguf.py
writes them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gguf import GGUFWriter, TokenType
from transformers import PreTrainedTokenizerBase

from hfpipe.errors import ConfigError

SUPPORTED_TOKENIZERS = "byte-level BPE with GPT-2's pre-tokenizer (hfpipe's trained BPE, GPT-2, SmolLM2 as shipped)"
# llama.cpp's name for GPT-2's pre-tokenizer regex, the one ByteLevel(use_regex=True) applies.
GPT2_PRE_TOKENIZER = "gpt-2"


@dataclass(frozen=True)
class GGUFVocab:
    """What a GGUF file says about its tokenizer."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, pad, unk, eot (a second stop token) -> id, the ones the tokenizer has
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Stop with one line unless `tokenizer` is one GGUF export writes exactly."""
    problem = _unsupported(tokenizer)
    if problem is not None:
        raise ConfigError(f"{where}: the tokenizer is {problem}; GGUF export supports {SUPPORTED_TOKENIZERS}.")


def _backend(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _unsupported(tokenizer: PreTrainedTokenizerBase) -> str | None:
    spec = _backend(tokenizer)
    if spec is None:
        return "not backed by the tokenizers library"
    model = spec["model"]
    if model["type"] != "BPE":
        return f"a {model['type']} tokenizer"
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "a BPE with byte fallback or word prefixes/suffixes"
    if spec.get("normalizer"):
        return f"a BPE with a {spec['normalizer']['type']} normalizer"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return f"a BPE pre-tokenized by {json.dumps(pre, sort_keys=True)}"
    return None


def gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: list[int]) -> GGUFVocab:
    """The GGUF tokenizer of `tokenizer` for a model with `vocab_size` embedding rows: ids the tokenizer lacks become
    unused `[PAD<id>]` tokens, as llama.cpp writes them. `stop_ids`: the tokens generation stops at, EOS first."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embedding rows."
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index].content)
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in _backend(tokenizer)["model"]["merges"]]
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        # llama.cpp stops at EOS and EOT (end of turn): a second stop token (say, <|im_end|> beside EOS) goes there.
        "eot": next((index for index in stop_ids if index != tokenizer.eos_token_id), None),
    }
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    return GGUFVocab(
        tokens=tokens,
        token_types=[int(kind) for kind in types],
        merges=merges,
        special_ids={name: index for name, index in special.items() if index is not None},
        add_bos=len(marked) > len(plain) and marked[0] == tokenizer.bos_token_id,
        add_eos=len(marked) > len(plain) and marked[-1] == tokenizer.eos_token_id,
        chat_template=tokenizer.chat_template or None,
    )


def add_vocab(writer: GGUFWriter, vocab: GGUFVocab) -> None:
    """Write `vocab` as the file's tokenizer.* keys."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GPT2_PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
        "eot": writer.add_eot_token_id,
    }
    for name, index in vocab.special_ids.items():
        adders[name](index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
