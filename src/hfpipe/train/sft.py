"""What the SFT recipe needs beyond the shared run tail: its config sections and checks, the model and
tokenizer (local dir, Hub name, .gguf or package-shipped model), data preparation and reports, LoRA.
The DPO recipe shares the model, tokenizer, row-source and LoRA parts (they read only keys both configs have)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from trl import DatasetMixtureConfig, ModelConfig, SFTConfig, get_peft_config

from hfpipe.config import ParsedConfig, parse
from hfpipe.data.chat_templates import (
    apply_chat_template_choice,
    check_saved_model,
    check_template_name,
    fit_model_to_tokenizer,
    has_generation_markers,
)
from hfpipe.data.files import cache_root, resolve_files
from hfpipe.data.sft_rows import Source, concatenate, load_source, mix, prepare_source, rendered_lengths
from hfpipe.devices import device_defaults, resolve_device_settings
from hfpipe.errors import ConfigError, DataError
from hfpipe.evaluation.evaluate import EvalArguments, check_config_evaluations
from hfpipe.hub.publish import check_hub_settings
from hfpipe.models.pretrained import check_model_path, load_causal_lm, load_tokenizer_from
from hfpipe.models.trained import save_merged_model
from hfpipe.sections import RunArguments, SFTArguments, TuningArguments
from hfpipe.train.callbacks import room_for
from hfpipe.train.run import RUN_DEFAULTS, derive_run_settings

SFT_ARGUMENTS = (SFTConfig, ModelConfig, SFTArguments, DatasetMixtureConfig, RunArguments, EvalArguments)

# SFT defaults on top of the shared run conventions and the device's precision: no gradient checkpointing (it
# trades speed for memory that small models do not need), LoRA without dropout (dropout makes LoRA slower than
# full fine-tuning), an evaluation before training.
SFT_DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "gradient_checkpointing": None,  # TRL turns it on; the v5 name below avoids a FutureWarning
    "activation_checkpointing": False,
    "eval_on_start": True,  # the held-out loss before training, to compare with the end
    "max_length": 512,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "eval_steps": 50,
    "lora_dropout": 0.0,
    "test_split_size": 0.1,
}
# On CPU, eager attention trained a 4-layer GPT-2 faster than sdpa at every length measured (64-512 tokens, bf16,
# padded batches: sdpa's CPU backward is slow); longer rows keep sdpa, whose memory grows linearly.
EAGER_MAX_LENGTH = 1024
LORA_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE = 5e-5


def validate_tuning(values: dict[str, Any], where: str, stage: str, learning_rates: tuple[float, float]) -> None:
    """Checks shared by SFT and DPO configs, before anything is loaded; fills the learning rate (full, LoRA) and
    derives output_dir and run_name (e.g. sft-pretrain-lora-r16)."""
    resolve_device_settings(values, where)
    if values.get("learning_rate") is None:
        values["learning_rate"] = learning_rates[1] if values.get("use_peft") else learning_rates[0]
    if not values.get("model_name_or_path"):
        raise ConfigError(f"{where}: model_name_or_path is required: a model dir (e.g. a pretrain output) or Hub id.")
    name = values["model_name_or_path"]
    if name.lower().endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise ConfigError(f"{where}: model_name_or_path: '{name}': no such .gguf file.")
    elif name not in _shipped_models():
        check_model_path(name, "model_name_or_path", where)
    if (values.get("load_in_4bit") or values.get("load_in_8bit")) and not torch.cuda.is_available():
        raise ConfigError(
            f"{where}: load_in_4bit / load_in_8bit (QLoRA) need a CUDA GPU for bitsandbytes and none was found. "
            "Use use_peft: true alone (LoRA) on this machine."
        )
    check_template_name(values.get("chat_template"), where)
    sources = [values.get("train_files"), values.get("dataset_name"), values.get("datasets")]
    if sum(bool(source) for source in sources) != 1:
        raise ConfigError(f"{where}: set exactly one of train_files, dataset_name or datasets (a mixture).")
    for key in ("train_files", "validation_files"):
        if values.get(key):
            resolve_files(values[key], key, where)
    if not 0.0 < values["test_split_size"] < 1.0:
        raise ConfigError(f"{where}: test_split_size: must be between 0 and 1 (exclusive).")
    check_config_evaluations(values, where)
    derive_run_settings(values, default_run_name(values, stage), where)


def _validate(values: dict[str, Any], where: str) -> None:
    if values.get("merge_adapter") and not values.get("use_peft"):
        raise ConfigError(f"{where}: merge_adapter needs use_peft: true (a full fine-tune is already merged).")
    validate_tuning(values, where, "sft", (FULL_LEARNING_RATE, LORA_LEARNING_RATE))
    on_cpu = not torch.cuda.is_available()
    if values.get("use_model_loss") is None:
        values["use_model_loss"] = on_cpu
    if values.get("attn_implementation") is None and on_cpu and (values.get("max_length") or 10**9) <= EAGER_MAX_LENGTH:
        values["attn_implementation"] = "eager"
    check_hub_settings(values, where, trains_adapter=bool(values.get("use_peft")))


def _shipped_models() -> tuple[str, ...]:
    from hfpipe.models.gguf import PACKAGED_MODELS

    return tuple(PACKAGED_MODELS)


def default_run_name(values: dict[str, Any], stage: str = "sft") -> str:
    """Name a run after its stage, model and method, e.g. sft-pretrain-lora-r16."""
    base = Path(str(values["model_name_or_path"]).rstrip("/")).name.removesuffix(".gguf")
    method = f"lora-r{values['lora_r']}" if values.get("use_peft") else "full"
    return f"{stage}-{base}-{method}"


def parse_sft(argv: Sequence[str] | None = None) -> ParsedConfig:
    """Parse and check an SFT config; derive output_dir, run_name and the learning rate. Loads nothing."""
    defaults = {**SFT_DEFAULTS, "save_steps": None, "learning_rate": None, **device_defaults(cpu_bf16=True)}
    return finish_tuning_parse(parse(SFT_ARGUMENTS, argv, defaults=defaults, validate=_validate))


def finish_tuning_parse(parsed: ParsedConfig) -> ParsedConfig:
    """Fix-ups after parsing an SFT or DPO config that cannot be expressed as defaults."""
    model_args, training_args = parsed.get(ModelConfig), parsed.get(TrainingArguments)
    if "include_num_input_tokens_seen" not in parsed.user_keys:
        # Real (non-padding) tokens for tokens/s; set here because argparse would read the default as a bool.
        training_args.include_num_input_tokens_seen = "non_padding"
    # TRL turns a one-item list into a bare string, which PEFT reads as a full-match regex that matches nothing.
    if isinstance(model_args.lora_target_modules, str) and model_args.lora_target_modules != "all-linear":
        model_args.lora_target_modules = [model_args.lora_target_modules]
    return parsed


def resolved_settings(parsed: ParsedConfig) -> dict[str, Any]:
    """What the user wrote plus what hfpipe derived (an SFT or DPO config)."""
    training_args = parsed.get(TrainingArguments)
    attention = parsed.get(ModelConfig).attn_implementation
    return {
        **parsed.user_keys,
        "output_dir": training_args.output_dir,
        "run_name": training_args.run_name,
        "bf16": training_args.bf16,
        "learning_rate": training_args.learning_rate,
        **({"attn_implementation": attention} if attention else {}),
    }


def load_tokenizer(parsed: ParsedConfig) -> tuple[PreTrainedTokenizerBase, str, str]:
    """Load the tokenizer with the chat template choice applied; return it, the choice and the model path
    (a .gguf file or package-shipped model is converted once to a model dir)."""
    from hfpipe.models.gguf import resolve_model_path

    model_args, training_args = parsed.get(ModelConfig), parsed.get(TrainingArguments)
    name = resolve_model_path(model_args.model_name_or_path, cache_root())
    tokenizer = load_tokenizer_from(
        name, "model_name_or_path", model_args.model_revision, training_args.trust_remote_code
    )
    choice = apply_chat_template_choice(parsed.get(TuningArguments).chat_template, tokenizer)
    return tokenizer, choice, name


def load_model(parsed: ParsedConfig, name: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Load the model to fine-tune, sized and configured for `tokenizer` (added tokens, EOS, pad)."""
    model_args, training_args = parsed.get(ModelConfig), parsed.get(TrainingArguments)
    model = load_causal_lm(
        name,
        model_args.model_revision,
        model_args.dtype,
        model_args.attn_implementation or "sdpa",
        training_args.trust_remote_code,
    )
    fit_model_to_tokenizer(model, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and training_args.max_length and training_args.max_length > positions:
        raise ConfigError(
            f"max_length={training_args.max_length} exceeds the {positions} positions of "
            f"'{model_args.model_name_or_path}'; set max_length: {positions} or less."
        )
    return model


def lora_config(parsed: ParsedConfig, model: PreTrainedModel) -> LoraConfig | None:
    """TRL's LoRA config from the ModelConfig keys, adjusted for GPT-2's Conv1D layers."""
    peft_config = get_peft_config(parsed.get(ModelConfig))
    if peft_config is not None and model.config.model_type == "gpt2":
        peft_config.fan_in_fan_out = True  # GPT-2 stores Conv1D weights transposed
    return peft_config


# Validates and converts one source: returns its rows in TRL's format, the format's name and the rows skipped.
RowPreparer = Callable[[Source, bool, TuningArguments], tuple[Dataset, str, int]]


def prepare_sft_rows(source: Source, chat: bool, data_args: TuningArguments) -> tuple[Dataset, str, int]:
    """SFT's row preparer: text, instruction, messages or prompt/completion rows."""
    return prepare_source(source, chat, data_args.system_prompt, data_args.skip_bad_rows)


def load_splits(
    parsed: ParsedConfig,
    tokenizer: PreTrainedTokenizerBase,
    smoke: bool,
    prepare: RowPreparer = prepare_sft_rows,
    count_tokens: Callable[[Dataset], int] | None = None,
) -> tuple[DatasetDict, str]:
    """Load, validate, convert and mix the training rows; split off validation rows when none are given.

    Returns the splits and a printable table of rows and tokens per source.
    """
    data_args, mixture = parsed.get(TuningArguments), parsed.get(DatasetMixtureConfig)
    where = str(parsed.path)
    chat = tokenizer.chat_template is not None

    def convert(sources: list[Source]) -> list[tuple[Dataset, str, int]]:
        prepared = [prepare(source, chat, data_args) for source in sources]
        for source, (_, _, skipped) in zip(sources, prepared, strict=True):
            if skipped:
                print(f"warning: {source.name}: skipped {skipped} rows that cannot be trained on (skip_bad_rows: true)")
        return prepared

    sources = _train_sources(data_args, mixture, where)
    prepared = convert(sources)
    parts = mix([dataset for dataset, _, _ in prepared], [source.fraction for source in sources])
    count_tokens = count_tokens or (lambda part: sum(total for _, total in rendered_lengths(part, tokenizer)))
    table = source_table(sources, [row_format for _, row_format, _ in prepared], parts, count_tokens)
    train = concatenate(parts)
    validation_sources = _validation_sources(data_args, where)
    if validation_sources:
        validation = concatenate([dataset for dataset, _, _ in convert(validation_sources)])
    else:
        split = train.train_test_split(test_size=mixture.test_split_size, seed=parsed.get(TrainingArguments).seed)
        train, validation = split["train"], split["test"]
    splits = DatasetDict({"train": train, "validation": validation})
    if smoke:
        splits = DatasetDict({name: split.select(range(min(len(split), 32))) for name, split in splits.items()})
    return splits, table


def _train_sources(data_args: TuningArguments, mixture: DatasetMixtureConfig, where: str) -> list[Source]:
    if data_args.train_files:
        return [Source(path, load_source(path, where)) for path in data_args.train_files]
    if data_args.dataset_name:
        return [_hub_source(data_args, data_args.dataset_train_split, where)]
    return [
        Source(
            config.path,
            load_source(
                config.path,
                where,
                name=config.name,
                data_dir=config.data_dir,
                data_files=config.data_files,
                split=config.split,
            ),
            config.fraction,
        )
        for config in mixture.datasets
    ]


def _validation_sources(data_args: TuningArguments, where: str) -> list[Source]:
    if data_args.validation_files:
        return [Source(path, load_source(path, where)) for path in data_args.validation_files]
    if data_args.dataset_name and data_args.dataset_test_split:
        return [_hub_source(data_args, data_args.dataset_test_split, where)]
    return []


def _hub_source(data_args: TuningArguments, split: str, where: str) -> Source:
    name = data_args.dataset_name
    return Source(name, load_source(name, where, name=data_args.dataset_config, split=split))


def source_table(
    sources: list[Source], formats: list[str], parts: list[Dataset], count_tokens: Callable[[Dataset], int]
) -> str:
    """Rows, tokens and share per source of the training mixture."""
    token_counts = [count_tokens(part) for part in parts]
    all_rows = sum(len(part) for part in parts) or 1
    lines = [f"{'source':<48} {'format':<18} {'rows':>7} {'share':>6} {'tokens':>9}"]
    for source, fmt, part, tokens in zip(sources, formats, parts, token_counts, strict=True):
        lines.append(f"{source.name[-48:]:<48} {fmt:<18} {len(part):>7} {len(part) / all_rows:>6.1%} {tokens:>9,}")
    return "\n".join(lines)


def length_report(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, skip_bad_rows: bool, source: str
) -> tuple[Dataset, dict[str, float]]:
    """Check rows against max_length: a row whose prompt leaves no room for the response is an error (or skipped);
    report the share of rows and tokens that truncation cuts."""
    lengths = rendered_lengths(dataset, tokenizer)
    hopeless = [index for index, (prompt, _) in enumerate(lengths) if prompt >= max_length]
    if hopeless and not skip_bad_rows:
        index = hopeless[0]
        raise DataError(
            f"{source}: row {index + 1}: the prompt alone is {lengths[index][0]} tokens, max_length is {max_length}, "
            "so nothing of the response would be trained on. Raise max_length, shorten the row, "
            "or set skip_bad_rows: true."
        )
    if hopeless:
        print(f"warning: {source}: skipped {len(hopeless)} rows whose prompt fills max_length={max_length}")
        keep = sorted(set(range(len(dataset))) - set(hopeless))
        dataset = dataset.select(keep)
        lengths = [lengths[index] for index in keep]
    total = sum(full for _, full in lengths) or 1
    cut = [max(0, full - max_length) for _, full in lengths]
    report = {
        "rows_truncated_fraction": sum(1 for c in cut if c) / max(1, len(lengths)),
        "tokens_truncated_fraction": sum(cut) / total,
        "train_tokens": total,
    }
    return dataset, report


def assistant_loss_mode(tokenizer: PreTrainedTokenizerBase, splits: DatasetDict) -> str:
    """How the loss is restricted: 'completion' (prompt-completion rows), 'assistant' (conversations with a
    template that marks assistant tokens), or 'all' (plain text)."""
    columns = splits["train"].column_names
    if "messages" in columns:
        if not has_generation_markers(tokenizer):
            raise DataError(
                "conversation rows: the chat template does not mark assistant tokens ({% generation %}), so the loss "
                "cannot be limited to the assistant's replies. Set chat_template: chatml."
            )
        return "assistant"
    return "completion" if "prompt" in columns else "all"


def sample_prompts(validation: Dataset, tokenizer: PreTrainedTokenizerBase, count: int = 2) -> list[str]:
    """Prompts of the first held-out rows, rendered as the model sees them at generation time."""
    prompts = []
    for row in validation.select(range(min(count, len(validation)))):
        if row.get("messages") is not None:
            prompts.append(
                tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
            )
        elif isinstance(row.get("prompt"), list):
            prompts.append(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False))
        elif row.get("prompt") is not None:
            prompts.append(row["prompt"])
        else:
            prompts.append(row["text"][:40])
    return prompts


def print_setup(
    training_args: SFTConfig,
    model: PreTrainedModel,
    table: str,
    template_choice: str,
    loss_mode: str,
    lengths: dict[str, float],
    threads: int,
) -> None:
    """Print the data table and one line on the model, template, loss, truncation and device."""
    print(table)
    print(
        f"{model.num_parameters():,} parameters | chat template: {template_choice} | loss on: {loss_mode} tokens | "
        f"truncated at max_length={training_args.max_length}: {lengths['rows_truncated_fraction']:.1%} of rows, "
        f"{lengths['tokens_truncated_fraction']:.1%} of tokens | "
        f"{f'CPU, {threads} threads' if training_args.use_cpu else 'accelerator'}"
    )
    if training_args.packing and training_args.use_cpu:
        print(
            "warning: packing on CPU: TRL keeps packed rows apart through position ids, which sdpa on CPU turns into "
            "a mask over the whole flattened batch (several times slower than length-grouped batches)."
        )


def check_and_merge(trainer: Any, tokenizer: PreTrainedTokenizerBase, first_row: dict, merge: bool) -> dict[str, Any]:
    """After saving: check that the saved tokenizer renders the first training row exactly and that generation
    stops at its EOS (loudly when not); merge the adapter on request. Returns entries for metrics.json."""
    output_dir = Path(trainer.args.output_dir)
    problems = check_saved_model(output_dir, first_row, trainer.train_dataset[0]["input_ids"])
    for problem in problems:
        print(f"WARNING: template check failed: {problem}")
    records: dict[str, Any] = {
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "template_check": problems or "ok",
    }
    if merge:
        records["merged_model"] = str(save_merged_model(output_dir, output_dir / "merged"))
    return records


@torch.no_grad()
def greedy_stop_rate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 64
) -> float:
    """Fraction of prompts whose greedy answer ends with the EOS token within `max_new_tokens`."""
    was_training = model.training
    model.eval()
    stopped = 0
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        room = room_for(model, inputs["input_ids"].shape[1], max_new_tokens)
        if room <= 0:
            continue
        output = model.generate(**inputs, max_new_tokens=room, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        stopped += int(output[0, -1].item() == tokenizer.eos_token_id)
    model.train(was_training)
    return stopped / max(1, len(prompts))
