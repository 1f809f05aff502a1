"""Supervised fine-tuning (full, LoRA, DoRA or QLoRA) with TRL's SFTTrainer.

    accelerate launch recipes/sft.py --config configs/sft/quickstart.yaml

Rows may be plain text, instruction/output, messages or prompt/completion; the loss covers the responses
only by default. Any YAML key can be overridden on the command line; `--smoke` runs a few steps; running
the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import set_seed
from trl import SFTConfig

from hfpipe.devices import use_cpu_cores
from hfpipe.errors import exit_on_user_error
from hfpipe.evaluation.evaluate import EvalArguments, evaluate_after_training
from hfpipe.hub.publish import push_run, take_push_request
from hfpipe.sections import RunArguments, SFTArguments
from hfpipe.train.callbacks import LogExtrasCallback, SampleCallback
from hfpipe.train.run import prepare_output_dir, save_and_evaluate, save_run_config, train, write_records
from hfpipe.train.sft import (
    assistant_loss_mode,
    check_and_merge,
    greedy_stop_rate,
    length_report,
    load_model,
    load_splits,
    load_tokenizer,
    lora_config,
    parse_sft,
    print_setup,
    resolved_settings,
    sample_prompts,
)
from hfpipe.train.sft_trainer import FastSFTTrainer


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = parse_sft(argv)
    training_args, run_args = parsed.get(SFTConfig), parsed.get(RunArguments)
    data_args = parsed.get(SFTArguments)
    output_dir = Path(training_args.output_dir)
    threads = use_cpu_cores(training_args.use_cpu)
    hub = take_push_request(training_args, run_args)
    with training_args.main_process_first(desc="preparing the output dir, model and data"):
        resume_from = prepare_output_dir(
            output_dir, run_args.overwrite_output_dir, str(parsed.path), training_args.process_index == 0
        )
        set_seed(training_args.seed)
        tokenizer, template_choice, model_path = load_tokenizer(parsed)
        splits, table = load_splits(parsed, tokenizer, run_args.smoke)
    splits["train"], lengths = length_report(
        splits["train"], tokenizer, training_args.max_length, data_args.skip_bad_rows, "training rows"
    )
    loss_mode = assistant_loss_mode(tokenizer, splits)
    training_args.assistant_only_loss = loss_mode == "assistant"
    model = load_model(parsed, model_path, tokenizer)
    print_setup(training_args, model, table, template_choice, loss_mode, lengths, threads)
    prompts = run_args.sample_prompts or sample_prompts(splits["validation"], tokenizer)
    log_extras = LogExtrasCallback(tokens_per_step=None)
    trainer = FastSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        peft_config=lora_config(parsed, model),
        callbacks=[SampleCallback(tokenizer, prompts, run_args.sample_max_new_tokens)],
        model_loss=data_args.use_model_loss,
    )
    trainer.callback_handler.callbacks.insert(0, log_extras)  # before the printer: it adds to the logs
    if training_args.process_index == 0:
        save_run_config(output_dir, "sft", resolved_settings(parsed), resuming=resume_from is not None)
    train(trainer, resume_from)
    eval_metrics = save_and_evaluate(trainer)
    extra = {
        "train_tokens_per_second": round(log_extras.tokens_per_second, 1),
        "train_rows": len(splits["train"]),
        "loss_on": loss_mode,
        "data_sources": table,
        "chat_template": template_choice,
        **lengths,
    }
    if trainer.is_world_process_zero():
        extra.update(check_and_merge(trainer, tokenizer, splits["train"][0], data_args.merge_adapter))
        held_out = sample_prompts(splits["validation"], tokenizer, count=16)
        extra["heldout_greedy_stops_at_eos"] = greedy_stop_rate(trainer.model, tokenizer, held_out)
        extra.update(evaluate_after_training(trainer, tokenizer, parsed.get(EvalArguments)))
    metrics = write_records(trainer, training_args.run_name, eval_metrics, extra)
    if metrics:
        start = metrics["eval_loss_at_start"]
        print(
            f"Done: {output_dir} | eval_loss {'' if start is None else f'{start:.4f} -> '}{metrics['eval_loss']:.4f} | "
            f"template check: {metrics['template_check']} | greedy answers ending at EOS: "
            f"{metrics['heldout_greedy_stops_at_eos']:.0%} | {metrics['train_tokens_per_second']:,} tokens/s"
        )
    if hub is not None and metrics:
        push_run(output_dir, hub)
    return metrics


if __name__ == "__main__":
    main()
