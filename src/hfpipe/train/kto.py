"""The KTO stage: its config (sections, defaults, derived settings, checks), the policy and its reference (chosen as
DPO chooses them: `dpo.load_policy`), the setup line and the held-out metrics. KTO learns from answers judged one
at a time, desirable or undesirable (`data/kto_rows.py`), against a reference and a batch-level KL estimate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from trl import DatasetMixtureConfig, KTOConfig, ModelConfig

from hfpipe.config import ParsedConfig
from hfpipe.config import parse as parse_config
from hfpipe.data.kto_rows import LABEL
from hfpipe.devices import device_defaults
from hfpipe.errors import ConfigError
from hfpipe.evaluation.evaluate import EvalArguments
from hfpipe.sections import DPOArguments, RunArguments
from hfpipe.train import dpo
from hfpipe.train.run_settings import RUN_DEFAULTS
from hfpipe.train.tuning import derive_tuning, finish_tuning_parse


@dataclass
class KTOArguments(DPOArguments):
    """hfpipe's KTO keys beside KTOConfig's: DPO's (the rows and adapter keys, the reference model, and what to do
    with an SFT adapter given as model_name_or_path), which mean the same here."""


ARGUMENTS = (KTOConfig, ModelConfig, KTOArguments, DatasetMixtureConfig, RunArguments, EvalArguments)

# NOTE: hfpipe's KTO defaults, where they differ from KTOConfig's and ModelConfig's, on top of the shared run
# conventions (RUN_DEFAULTS) and the device's precision (device_defaults). None: derived in `derive` below.
DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "gradient_checkpointing": None,  # TRL turns it on; activation_checkpointing (v5 name) decides
    "activation_checkpointing": False,  # small models: speed over memory (one sequence per row, not DPO's two)
    "eval_on_start": True,  # held-out rewards and KL before training, to compare with the end
    "max_length": 512,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": None,  # the training batch
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "eval_steps": 50,
    "lora_dropout": 0.0,  # dropout makes LoRA slower than full fine-tuning
    "test_split_size": 0.1,
    "learning_rate": None,  # LEARNING_RATES
    "save_steps": None,  # the evaluation steps
}
LEARNING_RATES = (1e-6, 1e-5)  # full fine-tuning (KTOConfig's default), LoRA (ten times it, as for DPO)
# KTOTrainer's held-out figures (it has no accuracy: rows are judged one at a time), and their plot labels.
START_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen", "logps/rejected")
PLOT_KEYS = {
    "eval_rewards/chosen": "desirable reward",
    "eval_rewards/rejected": "undesirable reward",
    "eval_rewards/margins": "margin",
    "eval_kl": "KL estimate",
}


def derive(values: dict[str, Any], where: str) -> None:
    """The settings a KTO config leaves to hfpipe (see DEFAULTS)."""
    derive_tuning(values, where, "kto", LEARNING_RATES)
    if values["per_device_eval_batch_size"] is None:
        values["per_device_eval_batch_size"] = values["per_device_train_batch_size"]


def check(values: dict[str, Any], where: str) -> None:
    """Refuse a KTO config that cannot run, before anything is loaded: DPO's checks (model, rows, adapter,
    reference), then what KTOTrainer would only refuse once the model has loaded."""
    dpo.check(values, where)
    if values["loss_type"] != "apo_zero_unpaired":  # the losses that estimate a KL term from the batch
        if values["per_device_train_batch_size"] < 2:
            raise ConfigError(
                f"{where}: per_device_train_batch_size: {values['per_device_train_batch_size']}: KTO estimates its "
                "KL term from the other rows of a batch; use 2 or more (or loss_type: apo_zero_unpaired)."
            )
        if values["train_sampling_strategy"] != "sequential":
            raise ConfigError(
                f"{where}: train_sampling_strategy: {values['train_sampling_strategy']}: KTO pairs each row with its "
                "neighbour's answer for the KL term, so it samples in order (hfpipe shuffles the rows once). Remove "
                "the key, or use loss_type: apo_zero_unpaired."
            )
    if values.get("sync_ref_model") and (values["reference"] != "copy" or dpo.trains_adapter(values)):
        raise ConfigError(
            f"{where}: sync_ref_model: true updates a frozen reference copy: it needs full fine-tuning with "
            "reference: copy (LoRA's and precomputed references have no copy to update)."
        )


def parse(argv: Sequence[str] | None = None) -> ParsedConfig:
    """Parse and check a KTO config; derive output_dir, run_name and the learning rate. Loads nothing."""
    defaults = {**DEFAULTS, **device_defaults()}
    return finish_tuning_parse(parse_config(ARGUMENTS, argv, defaults=defaults, derive=derive, check=check))


def resolved_settings(parsed: ParsedConfig) -> dict[str, Any]:
    """What the user wrote plus what hfpipe derived, with the reference choice."""
    return dpo.resolved_settings(parsed)


def print_setup(
    training_args: KTOConfig, policy: dpo.Policy, train: Dataset, table: str, template_choice: str, device: str
) -> None:
    """Print the data table and one line on the model, template, loss, rows of each label, reference and device."""
    desirable = sum(train[LABEL])
    print(table)
    print(
        f"{policy.model.num_parameters():,} parameters | chat template: {template_choice} | beta {training_args.beta} "
        f"| loss {training_args.loss_type} | training rows: {desirable} desirable (weight "
        f"{training_args.desirable_weight}), {len(train) - desirable} undesirable (weight "
        f"{training_args.undesirable_weight}) | reference: {policy.reference} ({policy.why}) | {device}"
    )


def metrics_at_start(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out rewards, KL and log-probs at the evaluation before training, for metrics.json (all rewards and the
    KL are 0 there: the policy is the reference)."""
    return dpo.reward_metrics_at_start(log_history, START_KEYS)
