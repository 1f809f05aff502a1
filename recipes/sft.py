"""Supervised fine-tuning (full, LoRA, DoRA or QLoRA) with TRL's SFTTrainer.

    accelerate launch recipes/sft.py --config configs/sft/quickstart.yaml

Rows may be plain text, instruction/output, messages or prompt/completion; the loss covers the responses
only by default. Any YAML key can be overridden on the command line; `--smoke` runs a few steps; running
the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import hfpipe  # noqa: F401 (first: it quiets the libraries' start-up noise before they load)

# isort: split
from collections.abc import Sequence

from trl import SFTConfig

from hfpipe.data import load_splits, prepare_sft_rows
from hfpipe.errors import exit_on_user_error
from hfpipe.sections import SFTArguments
from hfpipe.train import FastSFTTrainer, load_model, load_tokenizer, lora_config, sample_prompts, sft, start_run


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = sft.parse(argv)
    training_args, data_args = parsed.get(SFTConfig), parsed.get(SFTArguments)
    run = start_run("sft", parsed)
    with training_args.main_process_first(desc="loading the tokenizer and data"):
        tokenizer, template_choice, model_path = load_tokenizer(parsed)
        splits, table = load_splits(parsed, tokenizer, run.run_args.smoke, prepare=prepare_sft_rows)
    splits["train"], lengths = sft.length_report(
        splits["train"], tokenizer, training_args.max_length, data_args.skip_bad_rows, "training rows"
    )
    loss_mode = sft.assistant_loss_mode(tokenizer, splits)
    training_args.assistant_only_loss = loss_mode == "assistant"
    model = load_model(parsed, model_path, tokenizer)
    sft.print_setup(training_args, model, table, template_choice, loss_mode, lengths, run.device)
    trainer = FastSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        peft_config=lora_config(parsed, model),
        callbacks=run.callbacks(tokenizer, sample_prompts(splits["validation"], tokenizer)),
        model_loss=data_args.use_model_loss,
    )
    run.train(trainer)
    extra = {"train_rows": len(splits["train"]), "loss_on": loss_mode, "data_sources": table, **lengths}
    extra["chat_template"] = template_choice
    if trainer.is_world_process_zero():
        extra.update(sft.check_saved_template(trainer, splits["train"][0]))
        held_out = sample_prompts(splits["validation"], tokenizer, count=16)
        extra["heldout_greedy_stops_at_eos"] = sft.greedy_stop_rate(trainer.model, tokenizer, held_out)

    def summary(metrics: dict) -> str:
        start = metrics["eval_loss_at_start"]
        return (
            f"eval_loss {'' if start is None else f'{start:.4f} -> '}{metrics['eval_loss']:.4f} | template check: "
            f"{metrics['template_check']} | greedy answers ending at EOS: {metrics['heldout_greedy_stops_at_eos']:.0%}"
            f" | {metrics['train_tokens_per_second']:,} tokens/s"
        )

    return run.finish(trainer, tokenizer, extra, summary)


if __name__ == "__main__":
    main()
