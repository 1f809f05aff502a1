"""Pretrain a causal LM: a GPT-2 from scratch, or continued pretraining of an existing model.

    accelerate launch recipes/pretrain.py --config configs/pretrain/shakespeare_bpe.yaml

Any key of the YAML can be overridden on the command line (`--learning_rate 3e-4`); `--smoke` runs a few
steps on a slice of the data. Running the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import hfpipe  # noqa: F401 (first: it quiets the libraries' start-up noise before they load)

# isort: split
from collections.abc import Sequence

from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from hfpipe.data import load_raw_splits
from hfpipe.errors import exit_on_user_error
from hfpipe.sections import DataArguments
from hfpipe.train import RankReportCallback, pretrain, start_run


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = pretrain.parse(argv)
    training_args, data_args = parsed.get(TrainingArguments), parsed.get(DataArguments)
    run = start_run("pretrain", parsed)
    with training_args.main_process_first(desc="preparing the tokenizer and data"):
        raw = load_raw_splits(data_args, str(parsed.path), smoke=run.run_args.smoke)
        tokenizer = pretrain.load_tokenizer(parsed, raw, run.run_args.smoke)
        blocks = pretrain.load_blocks(parsed, raw, tokenizer, run.run_args.smoke)
    set_seed(training_args.seed)  # the same initial weights on every run and every rank
    model = pretrain.load_model(parsed, tokenizer)
    tokens_per_step = (
        data_args.block_size
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    print(
        f"{model.num_parameters():,} parameters | {len(blocks['train']):,} train and {len(blocks['validation']):,} "
        f"validation blocks of {data_args.block_size} tokens | {tokens_per_step:,} tokens per step | {run.device}"
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=run.callbacks(tokenizer, pretrain.default_prompts(blocks, tokenizer), RankReportCallback()),
    )
    run.train(trainer, tokens_per_step)
    extra = {"parameters": model.num_parameters(), "world_size": training_args.world_size}

    def summary(metrics: dict) -> str:
        return (
            f"eval_loss {metrics.get('eval_loss'):.4f} | perplexity {metrics.get('eval_perplexity'):.2f} | "
            f"{metrics['train_tokens_per_second']:,} tokens/s"
        )

    return run.finish(trainer, tokenizer, extra, summary)


if __name__ == "__main__":
    main()
