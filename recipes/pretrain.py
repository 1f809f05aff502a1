"""Pretrain a causal LM: a GPT-2 from scratch, or continued pretraining of an existing model.

    accelerate launch recipes/pretrain.py --config configs/pretrain/shakespeare_bpe.yaml

Any key of the YAML can be overridden on the command line (`--learning_rate 3e-4`); `--smoke` runs a few
steps on a slice of the data. Running the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from hfpipe.data.files import load_raw_splits
from hfpipe.devices import use_cpu_cores
from hfpipe.errors import exit_on_user_error
from hfpipe.evaluation.evaluate import EvalArguments, evaluate_after_training
from hfpipe.hub.publish import push_run, take_push_request
from hfpipe.sections import DataArguments, RunArguments
from hfpipe.train.callbacks import LogExtrasCallback, RankReportCallback, SampleCallback
from hfpipe.train.pretrain import (
    default_prompts,
    load_blocks,
    load_model,
    load_tokenizer,
    parse_pretrain,
    resolved_settings,
)
from hfpipe.train.run import finish, prepare_output_dir, save_run_config, train


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = parse_pretrain(argv)
    training_args = parsed.get(TrainingArguments)
    data_args, run_args = parsed.get(DataArguments), parsed.get(RunArguments)
    output_dir = Path(training_args.output_dir)
    threads = use_cpu_cores(training_args.use_cpu)
    hub = take_push_request(training_args, run_args)
    with training_args.main_process_first(desc="preparing the output dir, tokenizer and data"):
        resume_from = prepare_output_dir(
            output_dir, run_args.overwrite_output_dir, str(parsed.path), training_args.process_index == 0
        )
        raw = load_raw_splits(data_args, str(parsed.path), smoke=run_args.smoke)
        tokenizer = load_tokenizer(parsed, raw, run_args.smoke)
        blocks = load_blocks(parsed, raw, tokenizer, run_args.smoke)
    set_seed(training_args.seed)  # the same initial weights on every run and every rank
    model = load_model(parsed, tokenizer)
    tokens_per_step = (
        data_args.block_size
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    print(
        f"{model.num_parameters():,} parameters | {len(blocks['train']):,} train and {len(blocks['validation']):,} "
        f"validation blocks of {data_args.block_size} tokens | {tokens_per_step:,} tokens per step | "
        f"{f'CPU, {threads} threads' if training_args.use_cpu else 'accelerator'}"
    )
    prompts = run_args.sample_prompts or default_prompts(blocks, tokenizer)
    log_extras = LogExtrasCallback(tokens_per_step)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[SampleCallback(tokenizer, prompts, run_args.sample_max_new_tokens), RankReportCallback()],
    )
    trainer.callback_handler.callbacks.insert(0, log_extras)  # before the printer: it adds to the logs
    if training_args.process_index == 0:
        save_run_config(output_dir, "pretrain", resolved_settings(parsed), resuming=resume_from is not None)
    train(trainer, resume_from)
    extra = {
        "parameters": model.num_parameters(),
        "train_tokens_per_second": round(log_extras.tokens_per_second, 1),
        "world_size": training_args.world_size,
        **evaluate_after_training(trainer, tokenizer, parsed.get(EvalArguments)),
    }
    metrics = finish(trainer, training_args.run_name, extra)
    if metrics:
        print(
            f"Done: {output_dir} | eval_loss {metrics.get('eval_loss'):.4f} | "
            f"perplexity {metrics.get('eval_perplexity'):.2f} | {metrics['train_tokens_per_second']:,} tokens/s"
        )
    if hub is not None and metrics:
        push_run(output_dir, hub)
    return metrics


if __name__ == "__main__":
    main()
