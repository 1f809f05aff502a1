"""What the SFT and DPO stages (and every stage that fine-tunes a pretrained model on rows) share: the settings
derived and checked alike, the run name, the tokenizer with its chat template, the model sized for it, LoRA, and
sample prompts. Each reads only keys all those configs have."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from trl import ModelConfig, get_peft_config, get_quantization_config

from hfpipe.config import ParsedConfig
from hfpipe.data.chat_templates import apply_chat_template_choice, check_template_name, fit_model_to_tokenizer
from hfpipe.data.files import cache_root, resolve_files
from hfpipe.devices import resolve_device_settings
from hfpipe.errors import ConfigError
from hfpipe.evaluation.evaluate import check_config_evaluations
from hfpipe.models.pretrained import check_model_path, load_causal_lm, load_tokenizer_from, model_positions
from hfpipe.sections import TuningArguments
from hfpipe.train.run_settings import check_output_dir, check_report_to, derive_run_settings


def derive_tuning(values: dict[str, Any], where: str, stage: str, learning_rates: tuple[float, float]) -> None:
    """Settings derived alike for every fine-tuning stage: the device's, the learning rate when not set
    (`learning_rates`: full fine-tuning, LoRA), run_name (e.g. sft-pretrain-lora-r16), output_dir, save_steps."""
    resolve_device_settings(values, where)
    if values.get("learning_rate") is None:
        values["learning_rate"] = learning_rates[1] if values.get("use_peft") else learning_rates[0]
    derive_run_settings(values, default_run_name(values, stage))


def check_tuning(values: dict[str, Any], where: str) -> None:
    """Checks shared by every fine-tuning stage's config, before anything is loaded: the model, QLoRA, the chat
    template, the row sources, the held-out split, the eval_* files and the output dir."""
    if not values.get("model_name_or_path"):
        raise ConfigError(f"{where}: model_name_or_path is required: a model dir (e.g. a pretrain output) or Hub id.")
    name = values["model_name_or_path"]
    if name.lower().endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise ConfigError(f"{where}: model_name_or_path: '{name}': no such .gguf file.")
    elif name not in _shipped_models():
        check_model_path(name, "model_name_or_path", where)
    check_quantization(values, where)
    positions = model_positions(name, cache_root())
    if positions and values.get("max_length") and values["max_length"] > positions:
        raise ConfigError(
            f"{where}: max_length={values['max_length']} exceeds the {positions} positions of '{name}'; set "
            f"max_length: {positions} or less."
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
    check_output_dir(values, where)
    check_report_to(values, where)


def check_quantization(values: dict[str, Any], where: str) -> None:
    """QLoRA: a base loaded in 4 or 8 bits trains an adapter only, and needs bitsandbytes (CPU or GPU)."""
    bits = [key for key in ("load_in_4bit", "load_in_8bit") if values.get(key)]
    if not bits:
        return
    if len(bits) == 2:
        raise ConfigError(f"{where}: load_in_4bit and load_in_8bit are both true; keep one.")
    if not values.get("use_peft"):
        raise ConfigError(
            f"{where}: {bits[0]} quantizes the base model, which then cannot be trained itself: add use_peft: true "
            "(QLoRA trains a LoRA adapter on the quantized base)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{where}: {bits[0]} needs bitsandbytes: pip install -e '.[qlora]' (CPU and CUDA).")


def quantization_config(parsed: ParsedConfig) -> BitsAndBytesConfig | None:
    """TRL's bitsandbytes config from the ModelConfig keys (load_in_4bit: nf4 or fp4, double quantization, compute
    dtype; load_in_8bit), None without them. The 4-bit compute dtype follows `dtype`, else the training precision."""
    model_args, training_args = parsed.get(ModelConfig), parsed.get(TrainingArguments)
    if model_args.dtype in (None, "auto"):
        model_args = dataclasses.replace(model_args, dtype="bfloat16" if training_args.bf16 else "float32")
    return get_quantization_config(model_args)


def keep_4bit_layers_trainable(model: PreTrainedModel) -> None:
    """Keep bitsandbytes' 4-bit layers on their trainable CPU path.

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16, repacks a 4-bit layer's weights for its inference kernel at the
    first forward without gradients (the evaluation before training), and from then on no gradient reaches the
    layer's input: every LoRA adapter upstream of it stops learning, silently.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _shipped_models() -> tuple[str, ...]:
    from hfpipe.models.gguf import PACKAGED_MODELS

    return tuple(PACKAGED_MODELS)


def default_run_name(values: dict[str, Any], stage: str) -> str:
    """Name a run after its stage, model and method, e.g. sft-pretrain-lora-r16."""
    base = Path(str(values.get("model_name_or_path")).rstrip("/")).name.removesuffix(".gguf")
    method = f"lora-r{values['lora_r']}" if values.get("use_peft") else "full"
    return f"{stage}-{base}-{method}"


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


def tuning_settings(parsed: ParsedConfig) -> dict[str, Any]:
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


def load_model(
    parsed: ParsedConfig,
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    loader: Callable[..., PreTrainedModel] = load_causal_lm,
) -> PreTrainedModel:
    """Load the model to fine-tune with `loader` (a causal LM by default; `load_reward_model` for a scorer), sized and
    configured for `tokenizer` (added tokens, EOS, pad)."""
    model_args, training_args = parsed.get(ModelConfig), parsed.get(TrainingArguments)
    quantization = quantization_config(parsed)
    model = loader(
        name,
        model_args.model_revision,
        model_args.dtype,
        model_args.attn_implementation or "sdpa",
        training_args.trust_remote_code,
        quantization,
    )
    if quantization is not None:
        # Frozen quantized weights, norms in fp32; activation checkpointing stays the Trainer's to turn on.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layers_trainable(model)
    fit_model_to_tokenizer(model, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None)
    max_length = getattr(training_args, "max_length", None)  # GRPO has none: prompts + max_completion_length
    if positions and max_length and max_length > positions:
        raise ConfigError(
            f"max_length={max_length} exceeds the {positions} positions of "
            f"'{model_args.model_name_or_path}'; set max_length: {positions} or less."
        )
    return model


def lora_config(parsed: ParsedConfig, model: PreTrainedModel) -> LoraConfig | None:
    """TRL's LoRA config from the ModelConfig keys, adjusted for GPT-2's Conv1D layers."""
    peft_config = get_peft_config(parsed.get(ModelConfig))
    if peft_config is not None and model.config.model_type == "gpt2":
        peft_config.fan_in_fan_out = True  # GPT-2 stores Conv1D weights transposed
    return peft_config


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
