"""The GRPO stage: its config (sections, defaults, derived settings, checks), the rewards it trains on, and the
held-out evaluation before and after training: greedy answers to prompts never trained on, scored by the same
rewards (mean per reward, weighted total, accuracy of the first exact/numeric reward)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig

from hfpipe.config import ParsedConfig
from hfpipe.config import parse as parse_config
from hfpipe.devices import device_defaults
from hfpipe.errors import ConfigError
from hfpipe.evaluation.evaluate import EvalArguments
from hfpipe.hub.publish import check_hub_settings
from hfpipe.models.trained import load_reward_scorer
from hfpipe.sections import RunArguments, TuningArguments
from hfpipe.train.rewards import (
    CORRECTNESS_KINDS,
    RewardEntry,
    RewardFunc,
    build_reward_funcs,
    completion_text,
    outside_training,
    read_reward_entries,
)
from hfpipe.train.run_settings import RUN_DEFAULTS
from hfpipe.train.tuning import check_tuning, derive_tuning, finish_tuning_parse, tuning_settings


@dataclass
class GRPOArguments(TuningArguments):
    """hfpipe's GRPO keys beside GRPOConfig's: the rows and adapter keys, the rewards, the held-out evaluation."""

    rewards: list[dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "The rewards, weighted: a list of entries with one kind key each (regex, exact, numeric, length, "
            "eos, model, function) and optional weight and name. See hfpipe/train/rewards.py or the README."
        },
    )
    heldout_prompts: int | None = field(
        default=None,
        metadata={"help": "Held-out prompts answered greedily and scored before and after training. Default: all."},
    )


ARGUMENTS = (GRPOConfig, ModelConfig, GRPOArguments, DatasetMixtureConfig, RunArguments, EvalArguments)

# NOTE: hfpipe's GRPO defaults, where they differ from GRPOConfig's and ModelConfig's, on top of the shared run
# conventions (RUN_DEFAULTS) and the device's precision (device_defaults). None: derived in `derive` below. Chosen by
# measurement on 2 CPU cores (benchmarks/grpo_throughput.py); see benchmarks/README.md.
DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "gradient_checkpointing": None,  # TRL turns it on; activation_checkpointing (v5 name) decides
    "activation_checkpointing": False,  # short completions of small models: speed over memory
    # TRL's in-training evaluation samples num_generations answers per held-out prompt; hfpipe scores greedy answers
    # before and after instead (set eval_strategy: steps for TRL's as well).
    "eval_strategy": "no",
    "metric_for_best_model": None,
    "greater_is_better": None,
    "save_steps": 50,
    "logging_steps": 5,
    "max_completion_length": 32,
    "num_generations": 8,
    "per_device_train_batch_size": 16,  # completions: two prompts of 8 answers per step
    "per_device_eval_batch_size": 16,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 0.05,
    "num_train_epochs": 1.0,
    "lora_dropout": 0.0,  # dropout makes LoRA slower than full fine-tuning
    "test_split_size": 0.1,
    "learning_rate": None,  # LEARNING_RATES
    "dtype": None,  # bf16 for a LoRA base on a CPU where bf16 is fast, else TRL's fp32: see derive
}
LEARNING_RATES = (1e-6, 5e-5)  # full fine-tuning (TRL's default), LoRA
ACCURACY = "accuracy"


def derive(values: dict[str, Any], where: str) -> None:
    """The settings a GRPO config leaves to hfpipe (see DEFAULTS)."""
    derive_tuning(values, where, "grpo", LEARNING_RATES)
    if values.get("dtype") is None:
        # LoRA freezes the base: on a CPU where bf16 autocast measured faster, its weights in bf16 halve the memory
        # read by each generated token (SmolLM2-135M: generation 1.6x faster); the adapter stays fp32 (PEFT).
        frozen_base_on_bf16_cpu = values.get("use_peft") and values.get("use_cpu") and values.get("bf16")
        values["dtype"] = "bfloat16" if frozen_base_on_bf16_cpu else "float32"  # else TRL's default


def check(values: dict[str, Any], where: str) -> None:
    """Refuse a GRPO config that cannot run, before anything is loaded."""
    read_reward_entries(values.get("rewards"), where)
    if values.get("merge_adapter") and not values.get("use_peft"):
        raise ConfigError(f"{where}: merge_adapter needs use_peft: true (a full fine-tune is already merged).")
    if values.get("sample_prompts"):
        raise ConfigError(
            f"{where}: sample_prompts: GRPO writes its held-out answers before and after training to samples.jsonl. "
            "Remove the key."
        )
    generations, batch = values["num_generations"], values["per_device_train_batch_size"]
    steps = values.get("steps_per_generation") or values.get("gradient_accumulation_steps") or 1
    if values.get("generation_batch_size") is None and (batch * steps) % generations:
        raise ConfigError(
            f"{where}: per_device_train_batch_size ({batch}) x steps_per_generation ({steps}) must be a multiple of "
            f"num_generations ({generations}): each prompt's answers are compared within one generation batch."
        )
    if values.get("use_vllm"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: use_vllm: true generates with vLLM on a GPU, and none was found. Remove it.")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{where}: use_vllm: true needs vLLM: pip install vllm (TRL's vllm_* keys then apply).")
    check_tuning(values, where)
    check_hub_settings(values, where, trains_adapter=bool(values.get("use_peft")))


def parse(argv: Sequence[str] | None = None) -> ParsedConfig:
    """Parse and check a GRPO config; derive output_dir, run_name and the learning rate. Loads nothing."""
    defaults = {**DEFAULTS, **device_defaults(cpu_bf16=True)}
    parsed = finish_tuning_parse(parse_config(ARGUMENTS, argv, defaults=defaults, derive=derive, check=check))
    if "include_num_input_tokens_seen" not in parsed.user_keys:
        # GRPO's batches are prompts, not input_ids: the Trainer cannot count their tokens (and warns every step).
        parsed.get(GRPOConfig).include_num_input_tokens_seen = "no"
    return parsed


def resolved_settings(parsed: ParsedConfig) -> dict[str, Any]:
    """What the user wrote plus what hfpipe derived, with the dtype the model loads in."""
    return {**tuning_settings(parsed), "dtype": parsed.get(ModelConfig).dtype}


def reward_entries(parsed: ParsedConfig) -> list[RewardEntry]:
    """The config's checked reward entries."""
    return read_reward_entries(parsed.get(GRPOArguments).rewards, str(parsed.path))


def reward_funcs(
    parsed: ParsedConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[list[RewardFunc], list[float]]:
    """The config's rewards as TRL's callables and their weights."""
    entries = reward_entries(parsed)
    eos_ids = eos_token_ids(tokenizer)
    funcs = build_reward_funcs(entries, eos_ids, lambda name: load_reward_scorer(name, device))
    return funcs, [entry.weight for entry in entries]


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config's."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys(i for i in ids if i is not None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str:
    """A converted prompt as the model sees it at generation (the chat template's generation prompt for messages)."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Any], max_new_tokens: int, batch: int
) -> tuple[list[Any], list[list[int]]]:
    """Greedy answers to `prompts` in batches (left-padded), in the shape TRL passes completions to rewards, and
    their token ids (ending with EOS when the model stopped by itself)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    stops = eos_token_ids(tokenizer, model)
    completions, ids_list = [], []
    try:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            texts = [render_prompt(tokenizer, prompt) for prompt in chunk]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            for prompt, row in zip(chunk, output[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
                ends = [index for index, token in enumerate(row) if token in stops]
                ids = row[: ends[0] + 1] if ends else row
                text = tokenizer.decode(ids, skip_special_tokens=True)
                completions.append([{"role": "assistant", "content": text}] if isinstance(prompt, list) else text)
                ids_list.append(ids)
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return completions, ids_list


def heldout_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    funcs: list[RewardFunc],
    entries: list[RewardEntry],
    max_new_tokens: int,
    batch: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score greedy answers to the held-out prompts: each reward's mean, the weighted total (`reward`), and
    `accuracy` (the share the first exact/numeric reward scores 1) when there is one. Returns the scores and the
    answers (prompt, completion, rewards) for samples.jsonl."""
    prompts = list(rows["prompt"])
    completions, ids = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch)
    columns = {name: list(rows[name]) for name in rows.column_names if name != "prompt"} | outside_training()
    per_reward = {
        func.__name__: func(prompts=prompts, completions=completions, completion_ids=ids, **columns) for func in funcs
    }
    totals = [
        sum(entry.weight * (values[index] or 0.0) for entry, values in zip(entries, per_reward.values(), strict=True))
        for index in range(len(prompts))
    ]
    scores = {f"reward/{name}": _mean(values) for name, values in per_reward.items()}
    scores["reward"] = _mean(totals)
    correctness = next((entry for entry in entries if entry.kind in CORRECTNESS_KINDS), None)
    if correctness is not None:
        scores[ACCURACY] = _mean([float(value == 1.0) for value in per_reward[correctness.name]])
    scores["completion_tokens"] = _mean([len(row) for row in ids])
    answers = [
        {
            "prompt": render_prompt(tokenizer, prompt),
            "completion": completion_text(completion),
            "rewards": {name: values[index] for name, values in per_reward.items()},
        }
        for index, (prompt, completion) in enumerate(zip(prompts, completions, strict=True))
    ]
    return scores, answers


def _mean(values: list[float | None]) -> float:
    kept = [value for value in values if value is not None]
    return round(sum(kept) / len(kept), 4) if kept else float("nan")


def heldout_rows(rows: Dataset, limit: int | None) -> Dataset:
    """The held-out prompts scored before and after: the first `limit` (all by default)."""
    return rows if limit is None else rows.select(range(min(limit, len(rows))))
