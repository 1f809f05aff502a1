"""The SFT stage: its config (sections, defaults, derived settings, checks) and what its recipe reports beyond the
shared run: truncation, which tokens the loss covers, the setup line, the saved template check, greedy stops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DatasetMixtureConfig, ModelConfig, SFTConfig

from hfpipe.config import ParsedConfig
from hfpipe.config import parse as parse_config
from hfpipe.data.chat_templates import check_saved_model, has_generation_markers
from hfpipe.data.sources import rendered_lengths
from hfpipe.devices import device_defaults
from hfpipe.errors import ConfigError, DataError
from hfpipe.evaluation.evaluate import EvalArguments
from hfpipe.hub.publish import check_hub_settings
from hfpipe.sections import RunArguments, SFTArguments
from hfpipe.train.callbacks import room_for
from hfpipe.train.run_settings import RUN_DEFAULTS
from hfpipe.train.tuning import check_tuning, derive_tuning, finish_tuning_parse, tuning_settings

ARGUMENTS = (SFTConfig, ModelConfig, SFTArguments, DatasetMixtureConfig, RunArguments, EvalArguments)

# NOTE: hfpipe's SFT defaults, where they differ from SFTConfig's and ModelConfig's, on top of the shared run
# conventions (RUN_DEFAULTS) and the device's precision (device_defaults). None: derived in `derive` below.
DEFAULTS: dict[str, Any] = {
    **RUN_DEFAULTS,
    "gradient_checkpointing": None,  # TRL turns it on; the v5 name below avoids a FutureWarning
    "activation_checkpointing": False,  # it trades speed for memory that small models do not need
    "eval_on_start": True,  # the held-out loss before training, to compare with the end
    "max_length": 512,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "eval_steps": 50,
    "lora_dropout": 0.0,  # dropout makes LoRA slower than full fine-tuning
    "test_split_size": 0.1,
    "learning_rate": None,  # LEARNING_RATES
    "save_steps": None,  # the evaluation steps
    "use_model_loss": None,  # on CPU (see SFTArguments)
    "attn_implementation": None,  # eager on CPU up to EAGER_MAX_LENGTH, else sdpa
}
LEARNING_RATES = (5e-5, 2e-4)  # full fine-tuning, LoRA
# On CPU, eager attention trained a 4-layer GPT-2 faster than sdpa at every length measured (64-512 tokens, bf16,
# padded batches: sdpa's CPU backward is slow); longer rows keep sdpa, whose memory grows linearly.
EAGER_MAX_LENGTH = 1024


def derive(values: dict[str, Any], where: str) -> None:
    """The settings an SFT config leaves to hfpipe (see DEFAULTS)."""
    derive_tuning(values, where, "sft", LEARNING_RATES)
    on_cpu = not torch.cuda.is_available()
    if values.get("use_model_loss") is None:
        values["use_model_loss"] = on_cpu
    if values.get("attn_implementation") is None and on_cpu and (values.get("max_length") or 10**9) <= EAGER_MAX_LENGTH:
        values["attn_implementation"] = "eager"


def check(values: dict[str, Any], where: str) -> None:
    """Refuse an SFT config that cannot run, before anything is loaded."""
    if values.get("merge_adapter") and not values.get("use_peft"):
        raise ConfigError(f"{where}: merge_adapter needs use_peft: true (a full fine-tune is already merged).")
    check_tuning(values, where)
    check_hub_settings(values, where, trains_adapter=bool(values.get("use_peft")))


def parse(argv: Sequence[str] | None = None) -> ParsedConfig:
    """Parse and check an SFT config; derive output_dir, run_name and the learning rate. Loads nothing."""
    defaults = {**DEFAULTS, **device_defaults(cpu_bf16=True)}
    return finish_tuning_parse(parse_config(ARGUMENTS, argv, defaults=defaults, derive=derive, check=check))


def resolved_settings(parsed: ParsedConfig) -> dict[str, Any]:
    """What the user wrote plus what hfpipe derived."""
    return tuning_settings(parsed)


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


def print_setup(
    training_args: SFTConfig,
    model: PreTrainedModel,
    table: str,
    template_choice: str,
    loss_mode: str,
    lengths: dict[str, float],
    device: str,
) -> None:
    """Print the data table and one line on the model, template, loss, truncation and device."""
    print(table)
    print(
        f"{model.num_parameters():,} parameters | chat template: {template_choice} | loss on: {loss_mode} tokens | "
        f"truncated at max_length={training_args.max_length}: {lengths['rows_truncated_fraction']:.1%} of rows, "
        f"{lengths['tokens_truncated_fraction']:.1%} of tokens | {device}"
    )
    if training_args.packing and training_args.use_cpu:
        print(
            "warning: packing on CPU: TRL keeps packed rows apart through position ids, which sdpa on CPU turns into "
            "a mask over the whole flattened batch (several times slower than length-grouped batches)."
        )


def check_saved_template(trainer: Any, first_row: dict) -> dict[str, Any]:
    """After saving: check that the saved tokenizer renders the first training row exactly and that generation
    stops at its EOS (loudly when not). Returns entries for metrics.json."""
    output_dir = Path(trainer.args.output_dir)
    problems = check_saved_model(output_dir, first_row, trainer.train_dataset[0]["input_ids"])
    for problem in problems:
        print(f"WARNING: template check failed: {problem}")
    records: dict[str, Any] = {
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "template_check": problems or "ok",
    }
    return records


@torch.no_grad()
def greedy_stop_rate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 64
) -> float:
    """Fraction of prompts whose greedy answer ends with the EOS token within `max_new_tokens`.

    Prompts with the same room left in the context generate as one left-padded batch: one pass over the weights per
    new token for all of them, which is what a model whose weights cost the most to read (4-bit on a CPU) needs.
    """
    was_training = model.training
    model.eval()
    by_room: dict[int, list[list[int]]] = {}
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = room_for(model, len(ids), max_new_tokens)
        if room > 0:
            by_room.setdefault(room, []).append(ids)
    stopped = 0
    for room, rows in by_room.items():
        width = max(len(ids) for ids in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in rows])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=room,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        # A row that stopped is filled up with padding; with EOS as the pad that is EOS too, so look for the first.
        stopped += int((output[:, width:] == tokenizer.eos_token_id).any(dim=1).sum())
    model.train(was_training)
    return stopped / max(1, len(prompts))
