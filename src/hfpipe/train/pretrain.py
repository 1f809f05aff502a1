"""The pretrain stage: its config (sections, defaults, derived settings, checks), and its tokenizer (loaded or
trained on the corpus), packed blocks and model (a from-scratch GPT-2 or a pretrained one to continue)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from trl import ModelConfig

from hfpipe.config import ParsedConfig
from hfpipe.config import parse as parse_config
from hfpipe.data.files import cache_root, resolve_files
from hfpipe.data.text_blocks import (
    build_blocks,
    cap_validation,
    data_fingerprint,
    fingerprint_of,
    iter_texts,
    tokenizer_fingerprint,
)
from hfpipe.data.tokenizers import MIN_BPE_VOCAB, train_bpe, train_char
from hfpipe.devices import device_defaults, resolve_device_settings
from hfpipe.errors import ConfigError
from hfpipe.evaluation.evaluate import EvalArguments, check_config_evaluations
from hfpipe.hub.publish import check_hub_settings
from hfpipe.models.gpt2 import SHAPE_KEYS, build_gpt2, check_shape, resolve_shape
from hfpipe.models.pretrained import check_model_path, load_causal_lm, load_tokenizer_from, model_positions
from hfpipe.sections import DataArguments, GPT2ShapeArguments, RemoteCodeArguments, RunArguments, TokenizerArguments
from hfpipe.train.run_settings import RUN_DEFAULTS, check_output_dir, check_report_to, derive_run_settings

ARGUMENTS = (
    TrainingArguments,
    ModelConfig,
    DataArguments,
    TokenizerArguments,
    GPT2ShapeArguments,
    RunArguments,
    RemoteCodeArguments,
    EvalArguments,
)

# NOTE: hfpipe's pretraining defaults, where they differ from TrainingArguments', on top of the shared run conventions
# (RUN_DEFAULTS) and the device's precision (device_defaults): GPT-style optimizer settings and schedule.
DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "learning_rate": 6e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.02,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "num_train_epochs": 1.0,
    "eval_steps": 200,
    "save_steps": None,  # the evaluation steps
}
UNSUPPORTED_MODEL_KEYS = ("use_peft", "load_in_4bit", "load_in_8bit")


def default_run_name(values: dict[str, Any]) -> str:
    """Name a run after the model and its key settings, e.g. pretrain-gpt2-micro-bpe8192-ctx256."""
    if values.get("model_name_or_path"):
        base = Path(str(values["model_name_or_path"]).rstrip("/")).name
    else:
        base = f"gpt2-{values['model_size']}"
        if any(values.get(key) is not None for key in ("n_layer", "n_head", "n_embd")):
            base += "-" + "x".join(str(values.get(key) or "p") for key in ("n_layer", "n_head", "n_embd"))
        if not values.get("tokenizer_name_or_path"):
            base += "-char" if values["tokenizer_type"] == "char" else f"-bpe{values['vocab_size']}"
    return f"pretrain-{base}-ctx{values['block_size']}"


def derive(values: dict[str, Any], where: str) -> None:
    """The settings a pretrain config leaves to hfpipe: the device's, run_name, output_dir, save_steps."""
    resolve_device_settings(values, where)
    derive_run_settings(values, default_run_name(values))


def check(values: dict[str, Any], where: str) -> None:
    """Refuse a pretrain config that cannot run, before anything is loaded."""
    check_config_evaluations(values, where)
    for key in UNSUPPORTED_MODEL_KEYS:
        if values.get(key):
            raise ConfigError(f"{where}: {key}: pretraining trains every weight; use recipes/sft.py for adapters.")
    if values.get("block_size", 0) < 2:
        raise ConfigError(f"{where}: block_size: {values.get('block_size')} must be at least 2.")
    if not 0.0 < values["validation_split_fraction"] < 1.0:
        raise ConfigError(f"{where}: validation_split_fraction: must be between 0 and 1 (exclusive).")
    if values["sample_max_new_tokens"] <= 0:
        raise ConfigError(f"{where}: sample_max_new_tokens: must be greater than 0.")
    _check_model(values, where)
    _check_data(values, where)
    check_output_dir(values, where)
    check_report_to(values, where)
    check_hub_settings(values, where, trains_adapter=False)


def _check_model(values: dict[str, Any], where: str) -> None:
    if values.get("tokenizer_name_or_path"):
        check_model_path(values["tokenizer_name_or_path"], "tokenizer_name_or_path", where)
    if values.get("model_name_or_path"):
        check_model_path(values["model_name_or_path"], "model_name_or_path", where)
        shape_keys = [key for key in SHAPE_KEYS if values.get(key) is not None]
        if shape_keys:
            raise ConfigError(
                f"{where}: {shape_keys[0]} shapes a from-scratch model; with model_name_or_path the shape "
                "comes from the model. Remove one of them."
            )
        positions = model_positions(values["model_name_or_path"], cache_root(values.get("data_cache_dir")))
        if positions and values["block_size"] > positions:
            raise ConfigError(f"{where}: block_size={values['block_size']} exceeds the model's {positions} positions.")
        return
    shape = GPT2ShapeArguments(**{key: values[key] for key in ("model_size", "dropout", *SHAPE_KEYS)})
    check_shape(shape, values["block_size"], where)
    trains_bpe = not values.get("tokenizer_name_or_path") and values["tokenizer_type"] == "bpe"
    if trains_bpe and values["vocab_size"] < MIN_BPE_VOCAB:
        raise ConfigError(f"{where}: vocab_size: {values['vocab_size']} must be at least {MIN_BPE_VOCAB} for BPE.")


def _check_data(values: dict[str, Any], where: str) -> None:
    if not values.get("train_files") and not values.get("dataset_name"):
        raise ConfigError(f"{where}: no training data: set train_files (local files or globs) or dataset_name.")
    if values.get("train_files") and values.get("dataset_name"):
        raise ConfigError(f"{where}: both train_files and dataset_name are set; keep one.")
    for key in ("train_files", "validation_files"):
        if values.get(key):
            resolve_files(values[key], key, where)


def parse(argv: Sequence[str] | None = None) -> ParsedConfig:
    """Parse and check a pretrain config; derive output_dir and run_name. Loads and writes nothing."""
    return parse_config(ARGUMENTS, argv, defaults={**DEFAULTS, **device_defaults()}, derive=derive, check=check)


def resolved_settings(parsed: ParsedConfig) -> dict[str, Any]:
    """What the user wrote plus what hfpipe derived: a config that reruns this run."""
    training_args = parsed.get(TrainingArguments)
    model_args = parsed.get(ModelConfig)
    shape_args = parsed.get(GPT2ShapeArguments)
    data_args = parsed.get(DataArguments)
    settings = dict(parsed.user_keys)
    settings.update(output_dir=training_args.output_dir, run_name=training_args.run_name, bf16=training_args.bf16)
    if not model_args.model_name_or_path:
        settings.update(resolve_shape(shape_args, data_args.block_size))
    return settings


def load_tokenizer(parsed: ParsedConfig, raw: DatasetDict, smoke: bool) -> PreTrainedTokenizerBase:
    """Load the configured tokenizer, or train one on the training text (cached by data and settings)."""
    tok_args = parsed.get(TokenizerArguments)
    model_args = parsed.get(ModelConfig)
    trust_remote_code = parsed.get(RemoteCodeArguments).trust_remote_code
    name = tok_args.tokenizer_name_or_path or model_args.model_name_or_path
    if name:
        key = "tokenizer_name_or_path" if tok_args.tokenizer_name_or_path else "model_name_or_path"
        tokenizer = load_tokenizer_from(name, key, trust_remote_code=trust_remote_code)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer '{name}' has no EOS token; pretraining separates documents with it.")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # eos as pad: GPT-2 style tokenizers ship no pad token
        return tokenizer
    data_args = parsed.get(DataArguments)
    fingerprint = data_fingerprint(data_args, str(parsed.path), smoke)
    size = "char" if tok_args.tokenizer_type == "char" else tok_args.vocab_size
    cache_dir = (
        cache_root(data_args.data_cache_dir)
        / "tokenizers"
        / fingerprint_of([fingerprint, tok_args.tokenizer_type, size])
    )
    if (cache_dir / "tokenizer.json").is_file():
        print(f"Reusing the tokenizer trained on this data in {cache_dir}")
        return AutoTokenizer.from_pretrained(str(cache_dir))
    texts = iter_texts(raw["train"])
    print(f"Training a {tok_args.tokenizer_type} tokenizer on the training text")
    tokenizer = train_char(texts) if tok_args.tokenizer_type == "char" else train_bpe(texts, tok_args.vocab_size)
    tokenizer.save_pretrained(str(cache_dir))
    return tokenizer


def load_blocks(parsed: ParsedConfig, raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, smoke: bool) -> DatasetDict:
    """Return packed train/validation blocks, tokenized once and cached."""
    data_args = parsed.get(DataArguments)
    key = fingerprint_of(
        [
            data_fingerprint(data_args, str(parsed.path), smoke),
            tokenizer_fingerprint(tokenizer),
            data_args.block_size,
            data_args.validation_split_fraction,
        ]
    )
    blocks = build_blocks(raw, tokenizer, data_args, cache_root(data_args.data_cache_dir) / "blocks" / key)
    # Torch tensors straight from Arrow: the collator stacks them instead of converting Python lists.
    return cap_validation(blocks, data_args.max_eval_samples).with_format("torch")


def load_model(parsed: ParsedConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Build the from-scratch GPT-2, or load the model to continue pretraining."""
    model_args = parsed.get(ModelConfig)
    data_args = parsed.get(DataArguments)
    if not model_args.model_name_or_path:
        shape_args = parsed.get(GPT2ShapeArguments)
        shape = check_shape(shape_args, data_args.block_size, str(parsed.path))
        model = build_gpt2(shape, shape_args.dropout, tokenizer)
        model.config._attn_implementation = model_args.attn_implementation or "sdpa"
        return model
    model = load_causal_lm(
        model_args.model_name_or_path,
        model_args.model_revision,
        model_args.dtype,
        model_args.attn_implementation,
        parsed.get(RemoteCodeArguments).trust_remote_code,
    )
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and data_args.block_size > limit:
        raise ConfigError(f"block_size={data_args.block_size} exceeds the model's {limit} positions; lower it.")
    return model


def default_prompts(blocks: DatasetDict, tokenizer: PreTrainedTokenizerBase, count: int = 3) -> list[str]:
    """The first few tokens of a few validation blocks: prompts that fit any corpus."""
    validation = blocks["validation"]
    step = max(1, len(validation) // count)
    rows = range(0, min(len(validation), step * count), step)
    return [tokenizer.decode(validation[row]["input_ids"][:8]) for row in rows]
