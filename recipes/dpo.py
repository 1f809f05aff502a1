"""Preference alignment with TRL's DPOTrainer: full fine-tuning, LoRA, or an SFT adapter trained further.

    accelerate launch recipes/dpo.py --config configs/dpo/quickstart.yaml

Rows are prompt/chosen/rejected (strings or messages), instruction/chosen/rejected, or chosen/rejected
conversations. The reference model is the lightest valid option unless the config sets `reference`; the log
says which and why. Any YAML key can be overridden on the command line; `--smoke` runs a few steps; running the
same command again resumes from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from hfpipe.devices import use_cpu_cores
from hfpipe.errors import exit_on_user_error
from hfpipe.evaluation.evaluate import EvalArguments, evaluate_after_training
from hfpipe.hub.publish import push_run, take_push_request
from hfpipe.models.trained import save_merged_model
from hfpipe.sections import DPOArguments, RunArguments
from hfpipe.train.callbacks import LogExtrasCallback, SampleCallback
from hfpipe.train.dpo import (
    count_pair_tokens,
    load_policy,
    parse_dpo,
    policy_preference_accuracy,
    preference_preparer,
    resolved_settings,
    reward_metrics_at_start,
)
from hfpipe.train.plots import plot_rewards
from hfpipe.train.run import prepare_output_dir, save_and_evaluate, save_run_config, train, write_records
from hfpipe.train.sft import load_splits, load_tokenizer, sample_prompts


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = parse_dpo(argv)
    training_args, run_args = parsed.get(DPOConfig), parsed.get(RunArguments)
    dpo_args = parsed.get(DPOArguments)
    output_dir = Path(training_args.output_dir)
    threads = use_cpu_cores(training_args.use_cpu)
    hub = take_push_request(training_args, run_args)
    with training_args.main_process_first(desc="preparing the output dir, model and data"):
        resume_from = prepare_output_dir(
            output_dir, run_args.overwrite_output_dir, str(parsed.path), training_args.process_index == 0
        )
        set_seed(training_args.seed)
        tokenizer, template_choice, model_path = load_tokenizer(parsed)
        max_length = training_args.max_length
        splits, table = load_splits(
            parsed,
            tokenizer,
            run_args.smoke,
            prepare=preference_preparer(tokenizer, max_length),
            count_tokens=count_pair_tokens(tokenizer, max_length),
        )
    policy = load_policy(parsed, model_path, tokenizer, len(splits["train"]))
    print(table)
    print(
        f"{policy.model.num_parameters():,} parameters | chat template: {template_choice} | beta {training_args.beta} "
        f"| loss {','.join(training_args.loss_type)} | reference: {policy.reference} ({policy.why}) | "
        f"{f'CPU, {threads} threads' if training_args.use_cpu else 'accelerator'}"
    )
    preference_before = policy_preference_accuracy(policy.model, tokenizer, splits["validation"], max_length)
    prompts = run_args.sample_prompts or sample_prompts(splits["validation"], tokenizer)
    log_extras = LogExtrasCallback(tokens_per_step=None, perplexity=False)
    trainer = DPOTrainer(
        model=policy.model,
        ref_model=policy.ref_model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        peft_config=policy.peft_config,
        callbacks=[SampleCallback(tokenizer, prompts, run_args.sample_max_new_tokens)],
    )
    trainer.callback_handler.callbacks.insert(0, log_extras)  # before the printer: it adds to the logs
    if training_args.process_index == 0:
        save_run_config(output_dir, "dpo", resolved_settings(parsed), resuming=resume_from is not None)
    train(trainer, resume_from)
    eval_metrics = save_and_evaluate(trainer)
    extra = {
        "train_tokens_per_second": round(log_extras.tokens_per_second, 1),
        "train_rows": len(splits["train"]),
        "validation_rows": len(splits["validation"]),
        "data_sources": table,
        "reference": policy.reference,
        "reference_why": policy.why,
        "chat_template": template_choice,
        **reward_metrics_at_start(trainer.state.log_history),
        "heldout_policy_preference_before": preference_before,
    }
    if trainer.is_world_process_zero():
        extra["heldout_policy_preference_after"] = policy_preference_accuracy(
            trainer.model, tokenizer, splits["validation"], max_length
        )
        extra.update(evaluate_after_training(trainer, tokenizer, parsed.get(EvalArguments)))
        plot_rewards(trainer.state.log_history, output_dir / "rewards.png", training_args.run_name)
        if dpo_args.merge_adapter:
            extra["merged_model"] = str(save_merged_model(output_dir, output_dir / "merged"))
    metrics = write_records(trainer, training_args.run_name, eval_metrics, extra)
    if metrics:
        print(
            f"Done: {output_dir} | held-out reward accuracy {metrics.get('eval_rewards/accuracies', 0):.2f}, "
            f"margin {metrics.get('eval_rewards/margins', 0):.3f} | policy prefers chosen: "
            f"{preference_before:.2f} -> {metrics['heldout_policy_preference_after']:.2f}"
        )
    if hub is not None and metrics:
        push_run(output_dir, hub)
    return metrics


if __name__ == "__main__":
    main()
