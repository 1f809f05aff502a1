"""The DPO stage: its config (sections, defaults, derived settings, checks), the policy (a model dir, or an SFT
adapter dir continued or merged), the choice of reference model, preference rows, and the held-out reward metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from trl import DatasetMixtureConfig, DPOConfig, ModelConfig

from hfpipe.config import ParsedConfig
from hfpipe.config import parse as parse_config
from hfpipe.devices import device_defaults
from hfpipe.errors import ConfigError
from hfpipe.evaluation.evaluate import EvalArguments
from hfpipe.hub.publish import check_hub_settings
from hfpipe.models.pretrained import looks_local
from hfpipe.rundir import MERGED_SFT_DIR, adapter_base
from hfpipe.sections import DPOArguments, RunArguments
from hfpipe.train.run_settings import RUN_DEFAULTS
from hfpipe.train.tuning import (
    check_tuning,
    derive_tuning,
    finish_tuning_parse,
    load_model,
    lora_config,
    tuning_settings,
)

ARGUMENTS = (DPOConfig, ModelConfig, DPOArguments, DatasetMixtureConfig, RunArguments, EvalArguments)

# NOTE: hfpipe's DPO defaults, where they differ from DPOConfig's and ModelConfig's, on top of the shared run
# conventions (RUN_DEFAULTS) and the device's precision (device_defaults). None: derived in `derive` below.
DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "gradient_checkpointing": None,  # TRL turns it on; activation_checkpointing (v5 name) decides
    "activation_checkpointing": None,  # with LoRA only: see derive
    "eval_on_start": True,  # held-out rewards before training, to compare with the end
    "max_length": 512,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": None,  # the training batch: a pair is two sequences
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "eval_steps": 50,
    "lora_dropout": 0.0,  # dropout makes LoRA slower than full fine-tuning
    "test_split_size": 0.1,
    "learning_rate": None,  # LEARNING_RATES
    "save_steps": None,  # the evaluation steps
}
LEARNING_RATES = (5e-7, 5e-6)  # full fine-tuning, LoRA (the alignment handbook's)
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _is_adapter_dir(name: str | None) -> bool:
    return bool(name) and looks_local(name) and adapter_base(Path(name).expanduser()) is not None


def _continues_adapter(values: dict[str, Any]) -> bool:
    return _is_adapter_dir(values.get("model_name_or_path")) and values["sft_adapter"] == "continue"


def trains_adapter(values: dict[str, Any]) -> bool:
    """Whether the config trains an adapter: a new one (use_peft) or an SFT adapter continued."""
    return bool(values.get("use_peft")) or _continues_adapter(values)


def derive(values: dict[str, Any], where: str) -> None:
    """The settings a DPO config leaves to hfpipe (see DEFAULTS)."""
    derive_tuning(values, where, "dpo", LEARNING_RATES)
    if values["activation_checkpointing"] is None:
        # LoRA is the memory-light choice: without checkpointing, activations and vocabulary logits of chosen and
        # rejected sequences dominate its memory (measured on SmolLM2-135M: 4.1 GB peak, 2.7 GB with it). Full
        # fine-tuning of small models keeps the faster path.
        values["activation_checkpointing"] = trains_adapter(values)
    if values["per_device_eval_batch_size"] is None:
        values["per_device_eval_batch_size"] = values["per_device_train_batch_size"]


def check(values: dict[str, Any], where: str) -> None:
    """Refuse a DPO config that cannot run, before anything is loaded."""
    check_tuning(values, where)
    if _continues_adapter(values) and values.get("use_peft"):
        raise ConfigError(
            f"{where}: use_peft adds a new adapter, but model_name_or_path is an adapter dir that sft_adapter: "
            "continue keeps training. Remove use_peft, or set sft_adapter: merge to merge it and add a new one."
        )
    lora = trains_adapter(values)
    if values.get("merge_adapter") and not lora:
        raise ConfigError(f"{where}: merge_adapter needs an adapter (use_peft: true, or an SFT adapter to continue).")
    reference = values["reference"]
    if reference == "adapter" and not values.get("use_peft"):
        raise ConfigError(
            f"{where}: reference: adapter needs use_peft: true (the base with the new adapter disabled is the "
            "reference). Use reference: auto, precompute or copy."
        )
    if values.get("precompute_ref_log_probs") and reference in ("adapter", "copy"):
        raise ConfigError(
            f"{where}: precompute_ref_log_probs: true contradicts reference: {reference}; keep one of them."
        )
    check_hub_settings(values, where, trains_adapter=lora)


def parse(argv: Sequence[str] | None = None) -> ParsedConfig:
    """Parse and check a DPO config; derive output_dir, run_name and the learning rate. Loads nothing."""
    defaults = {**DEFAULTS, **device_defaults()}
    return finish_tuning_parse(parse_config(ARGUMENTS, argv, defaults=defaults, derive=derive, check=check))


def resolved_settings(parsed: ParsedConfig) -> dict[str, Any]:
    """What the user wrote plus what hfpipe derived, with the reference choice."""
    return {**tuning_settings(parsed), "reference": parsed.get(DPOArguments).reference}


@dataclass
class Policy:
    """The model DPO trains, the adapter config to add (if any), the reference model and why it was chosen."""

    model: PreTrainedModel
    peft_config: LoraConfig | None
    ref_model: PreTrainedModel | None
    reference: str
    why: str


def load_policy(parsed: ParsedConfig, name: str, tokenizer: PreTrainedTokenizerBase, train_rows: int) -> Policy:
    """Load the policy and pick the reference model (the lightest valid option unless the config names one).

    An SFT adapter dir is loaded onto its base: continued (TRL copies it as a frozen 'ref' adapter, the reference)
    or merged first. With use_peft the reference is the same weights with the new adapter disabled; with full
    fine-tuning it is precomputed log-probs (no second model) when training sees every row at least once, else a
    frozen copy (precomputing rows never trained on would cost more than it saves).
    """
    dpo_args, training_args = parsed.get(DPOArguments), parsed.get(TrainingArguments)  # KTO's too
    base = adapter_base(Path(name)) if looks_local(name) else None
    model = load_model(parsed, base or name, tokenizer)
    if base is not None:
        if dpo_args.sft_adapter == "continue":
            model = PeftModel.from_pretrained(model, name, is_trainable=True)
            why = "the SFT adapter is trained further; TRL keeps its starting state as a frozen 'ref' adapter"
            return Policy(model, None, None, "sft adapter copy", why)
        model = PeftModel.from_pretrained(model, name).merge_and_unload()
        # The merged SFT model is the base of whatever is trained next: save it, so that a new adapter names a base
        # that exists (PEFT records the model's name_or_path as the adapter's base).
        merged_dir = Path(training_args.output_dir) / MERGED_SFT_DIR
        if training_args.process_index == 0 and not (merged_dir / "config.json").is_file():
            model.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
        model.name_or_path = str(merged_dir)
    peft_config = lora_config(parsed, model)
    choice = dpo_args.reference
    if training_args.precompute_ref_log_probs:
        choice = "precompute"
    if choice == "auto":
        if peft_config is not None:
            choice, why = "adapter", "LoRA: the policy with its adapter disabled is the reference, no second copy"
        elif _rows_seen(training_args, train_rows) >= train_rows:
            choice, why = "precompute", "full fine-tuning that sees every row: reference log-probs computed once"
        else:
            choice, why = "copy", "full fine-tuning on part of the rows: a frozen copy scores only the rows trained on"
    else:
        why = "set in the config"
    ref_model = None
    if choice == "copy":
        # Passed explicitly: without it DPOTrainer re-creates it from config._name_or_path, which fails for local dirs.
        ref_model = load_model(parsed, base or name, tokenizer)
        if base is not None:
            ref_model = PeftModel.from_pretrained(ref_model, name).merge_and_unload()
        ref_model.eval().requires_grad_(False)
    training_args.precompute_ref_log_probs = choice == "precompute"
    return Policy(model, peft_config, ref_model, choice, why)


def print_setup(training_args: DPOConfig, policy: Policy, table: str, template_choice: str, device: str) -> None:
    """Print the data table and one line on the model, template, loss, reference and device."""
    print(table)
    print(
        f"{policy.model.num_parameters():,} parameters | chat template: {template_choice} | beta {training_args.beta} "
        f"| loss {','.join(training_args.loss_type)} | reference: {policy.reference} ({policy.why}) | {device}"
    )


def _rows_seen(training_args: DPOConfig, train_rows: int) -> float:
    if training_args.max_steps and training_args.max_steps > 0:
        per_step = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size
        )
        return training_args.max_steps * per_step
    return training_args.num_train_epochs * train_rows


def reward_metrics_at_start(
    log_history: list[dict[str, Any]], keys: Sequence[str] = (*REWARD_KEYS, "logps/chosen", "logps/rejected")
) -> dict[str, Any]:
    """Held-out rewards, accuracy and log-probs (`keys`, DPO's by default) at the evaluation before training (the
    final ones are the eval_* metrics), for metrics.json.

    At step 0 the policy equals the reference, so every implicit reward is 0 and TRL's accuracy (chosen strictly
    above rejected) is 0; the policy's own preference (log-likelihood of chosen above rejected) is the meaningful
    "before" figure and is reported beside it.
    """
    first = next((entry for entry in log_history if f"eval_{keys[0]}" in entry), None)
    if first is None or first.get("step") != 0:
        return {}
    return {f"eval_{key}_at_start": first[f"eval_{key}"] for key in keys if f"eval_{key}" in first}


def policy_preference_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset, max_length: int
) -> float:
    """Fraction of converted preference rows whose chosen answer the model finds more likely than the rejected one
    (summed log-probabilities of the answer tokens given the prompt, rendered as TRL renders them)."""
    from hfpipe.evaluation.scoring import PreferenceRow, preference_logprobs, preference_metrics

    was_training = model.training
    model.eval()
    converted = [PreferenceRow(dict(row), "prompt") for row in rows]  # converted rows are kept as they are
    scores, _ = preference_logprobs(model, tokenizer, converted, 8, max_length)
    model.train(was_training)
    return preference_metrics(scores)["accuracy"]
