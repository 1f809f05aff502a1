"""The reward-model stage: its config (sections, defaults, derived settings, checks) and its model: a causal LM's
body with a one-number head (TRL's RewardTrainer learns chosen above rejected), trained on preference pairs in every
format DPO reads, fully or with LoRA (the head is trained and saved with the adapter)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DatasetMixtureConfig, ModelConfig, RewardConfig

from hfpipe.config import ParsedConfig
from hfpipe.config import parse as parse_config
from hfpipe.data.chat_templates import render_ids
from hfpipe.devices import device_defaults
from hfpipe.errors import ConfigError
from hfpipe.evaluation.evaluate import EvalArguments
from hfpipe.hub.publish import check_hub_settings
from hfpipe.models.pretrained import load_reward_model
from hfpipe.sections import RunArguments, TuningArguments
from hfpipe.train.run_settings import RUN_DEFAULTS
from hfpipe.train.tuning import check_tuning, derive_tuning, finish_tuning_parse, load_model, tuning_settings


@dataclass
class RewardArguments(TuningArguments):
    """hfpipe's reward-model keys beside RewardConfig's: the rows and adapter keys fine-tuning stages share."""


ARGUMENTS = (RewardConfig, ModelConfig, RewardArguments, DatasetMixtureConfig, RunArguments, EvalArguments)

# NOTE: hfpipe's reward-model defaults, where they differ from RewardConfig's and ModelConfig's, on top of the shared
# run conventions (RUN_DEFAULTS) and the device's precision (device_defaults). None: derived in `derive` below.
DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "gradient_checkpointing": None,  # TRL turns it on; activation_checkpointing (v5 name) decides
    "activation_checkpointing": False,  # small models: speed over memory
    "eval_on_start": True,  # held-out accuracy before training, to compare with the end
    "max_length": 512,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": None,  # the training batch: a pair is two sequences
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.05,
    "eval_steps": 50,
    "lora_dropout": 0.0,  # dropout makes LoRA slower than full fine-tuning
    "lora_task_type": "SEQ_CLS",  # PEFT then trains and saves the new score head with the adapter
    "test_split_size": 0.1,
    "learning_rate": None,  # LEARNING_RATES
    "save_steps": None,  # the evaluation steps
}
LEARNING_RATES = (1e-5, 1e-4)  # full fine-tuning, LoRA (TRL's reward default)
ACCURACY, MARGIN = "eval_accuracy", "eval_margin"  # RewardTrainer's held-out metrics
PAIR = ("chosen", "rejected")


def derive(values: dict[str, Any], where: str) -> None:
    """The settings a reward config leaves to hfpipe (see DEFAULTS)."""
    derive_tuning(values, where, "reward", LEARNING_RATES)
    if values["per_device_eval_batch_size"] is None:
        values["per_device_eval_batch_size"] = values["per_device_train_batch_size"]


def check(values: dict[str, Any], where: str) -> None:
    """Refuse a reward config that cannot run, before anything is loaded."""
    if values.get("merge_adapter") and not values.get("use_peft"):
        raise ConfigError(f"{where}: merge_adapter needs use_peft: true (a full fine-tune is already merged).")
    if values.get("use_peft") and values.get("lora_task_type") != "SEQ_CLS":
        raise ConfigError(
            f"{where}: lora_task_type: {values.get('lora_task_type')!r}: a reward model's adapter is SEQ_CLS, which "
            "also trains and saves the score head. Remove the key."
        )
    if values.get("sample_prompts"):
        raise ConfigError(f"{where}: sample_prompts: a reward model scores text and generates none. Remove the key.")
    check_tuning(values, where)
    check_hub_settings(values, where, trains_adapter=bool(values.get("use_peft")))


def parse(argv: Sequence[str] | None = None) -> ParsedConfig:
    """Parse and check a reward config; derive output_dir, run_name and the learning rate. Loads nothing."""
    defaults = {**DEFAULTS, **device_defaults()}
    return finish_tuning_parse(parse_config(ARGUMENTS, argv, defaults=defaults, derive=derive, check=check))


def resolved_settings(parsed: ParsedConfig) -> dict[str, Any]:
    """What the user wrote plus what hfpipe derived."""
    return tuning_settings(parsed)


def load_scorer(parsed: ParsedConfig, name: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model to train: `name` with a one-output score head (new when `name` is a causal LM)."""
    return load_model(parsed, name, tokenizer, loader=load_reward_model)


def accuracy_at_start(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Held-out accuracy and margin at the evaluation before training, for metrics.json (the final ones are the
    eval_* metrics)."""
    first = next((entry for entry in log_history if ACCURACY in entry), None)
    if first is None or first.get("step") != 0:
        return {}
    return {f"{key}_at_start": first[key] for key in (ACCURACY, MARGIN) if key in first}


def pair_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset) -> dict[str, float]:
    """Over every converted preference row: the share whose chosen answer scores above the rejected one, and the
    mean margin (RewardTrainer's eval figures average its batches instead)."""
    scores = score_pairs(model, tokenizer, rows)
    return {
        "accuracy": sum(chosen > rejected for chosen, rejected in scores) / max(1, len(scores)),
        "margin": sum(chosen - rejected for chosen, rejected in scores) / max(1, len(scores)),
    }


@torch.no_grad()
def score_pairs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset) -> list[tuple[float, float]]:
    """The reward of chosen and of rejected for each converted preference row (prompt + answer, as RewardTrainer
    renders it)."""
    was_training = model.training
    model.eval()
    scores = []
    for row in rows:
        chosen, rejected = (
            model(input_ids=torch.tensor([ids], device=model.device)).logits[0, 0].item()
            for ids in (render_ids(tokenizer, {"prompt": row["prompt"], "completion": row[key]}) for key in PAIR)
        )
        scores.append((chosen, rejected))
    model.train(was_training)
    return scores
