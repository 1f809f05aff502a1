"""Preference alignment with TRL's DPOTrainer: full fine-tuning, LoRA, or an SFT adapter trained further.

    accelerate launch recipes/dpo.py --config configs/dpo/quickstart.yaml

Rows are prompt/chosen/rejected (strings or messages), instruction/chosen/rejected, or chosen/rejected
conversations. The reference model is the lightest valid option unless the config sets `reference`; the log
says which and why. Any YAML key can be overridden on the command line; `--smoke` runs a few steps; running the
same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import hfpipe  # noqa: F401 (first: it quiets the libraries' start-up noise before they load)

# isort: split
from collections.abc import Sequence

from trl import DPOConfig, DPOTrainer

from hfpipe.data import count_pair_tokens, load_splits, preference_preparer
from hfpipe.errors import exit_on_user_error
from hfpipe.rundir import REWARD_PLOT
from hfpipe.train import dpo, load_tokenizer, sample_prompts, start_run
from hfpipe.train.plots import plot_rewards


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = dpo.parse(argv)
    training_args = parsed.get(DPOConfig)
    max_length = training_args.max_length
    run = start_run("dpo", parsed)
    with training_args.main_process_first(desc="loading the tokenizer and data"):
        tokenizer, template_choice, model_path = load_tokenizer(parsed)
        prepare, count = preference_preparer(tokenizer, max_length), count_pair_tokens(tokenizer, max_length)
        splits, table = load_splits(parsed, tokenizer, run.run_args.smoke, prepare=prepare, count_tokens=count)
    policy = dpo.load_policy(parsed, model_path, tokenizer, len(splits["train"]))
    dpo.print_setup(training_args, policy, table, template_choice, run.device)
    preference_before = dpo.policy_preference_accuracy(policy.model, tokenizer, splits["validation"], max_length)
    trainer = DPOTrainer(
        model=policy.model,
        ref_model=policy.ref_model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        peft_config=policy.peft_config,
        callbacks=run.callbacks(tokenizer, sample_prompts(splits["validation"], tokenizer)),
    )
    run.train(trainer, perplexity=False)
    extra = {"train_rows": len(splits["train"]), "validation_rows": len(splits["validation"]), "data_sources": table}
    extra.update(reference=policy.reference, reference_why=policy.why, chat_template=template_choice)
    extra.update(dpo.reward_metrics_at_start(trainer.state.log_history))
    extra["heldout_policy_preference_before"] = preference_before
    if trainer.is_world_process_zero():
        after = dpo.policy_preference_accuracy(trainer.model, tokenizer, splits["validation"], max_length)
        extra["heldout_policy_preference_after"] = after
        plot_rewards(trainer.state.log_history, run.output_dir / REWARD_PLOT, training_args.run_name)

    def summary(metrics: dict) -> str:
        return (
            f"held-out reward accuracy {metrics.get('eval_rewards/accuracies', 0):.2f}, margin "
            f"{metrics.get('eval_rewards/margins', 0):.3f} | policy prefers chosen: "
            f"{preference_before:.2f} -> {metrics['heldout_policy_preference_after']:.2f}"
        )

    return run.finish(trainer, tokenizer, extra, summary)


if __name__ == "__main__":
    main()
