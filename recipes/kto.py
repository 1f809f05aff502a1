"""Preference alignment with TRL's KTOTrainer: answers judged one at a time, full fine-tuning, LoRA, or an SFT
adapter trained further.

    accelerate launch recipes/kto.py --config configs/kto/quickstart.yaml

Rows are unpaired prompt/completion/label (or instruction/output/label) rows, label true for a desirable answer, or
preference pairs in every format recipes/dpo.py reads, each unrolled into a desirable and an undesirable row. The
reference model is chosen as DPO chooses it unless the config sets `reference`; the log says which and why. Any YAML
key can be overridden on the command line; `--smoke` runs a few steps; running the same command again resumes from
the last checkpoint.
"""

from __future__ import annotations

import hfpipe  # noqa: F401 (first: it quiets the libraries' start-up noise before they load)

# isort: split
from collections.abc import Sequence

from trl import KTOConfig, KTOTrainer

from hfpipe.data import count_kto_tokens, held_out_pairs, kto_preparer, kto_splits, load_splits
from hfpipe.errors import exit_on_user_error
from hfpipe.rundir import REWARD_PLOT
from hfpipe.train import dpo, kto, load_tokenizer, sample_prompts, start_run
from hfpipe.train.plots import plot_eval_curves


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = kto.parse(argv)
    training_args = parsed.get(KTOConfig)
    max_length = training_args.max_length
    run = start_run("kto", parsed)
    with training_args.main_process_first(desc="loading the tokenizer and data"):
        tokenizer, template_choice, model_path = load_tokenizer(parsed)
        prepare, count = kto_preparer(tokenizer, max_length), count_kto_tokens(tokenizer, max_length)
        splits, table = load_splits(parsed, tokenizer, run.run_args.smoke, prepare=prepare, count_tokens=count)
        rows = kto_splits(splits, training_args.seed)
    policy = dpo.load_policy(parsed, model_path, tokenizer, len(rows["train"]))
    kto.print_setup(training_args, policy, rows["train"], table, template_choice, run.device)
    pairs = held_out_pairs(splits["validation"])
    extra = {"train_rows": len(rows["train"]), "validation_rows": len(rows["validation"]), "data_sources": table}
    extra.update(train_desirable_rows=sum(rows["train"]["label"]), reference=policy.reference)
    extra.update(reference_why=policy.why, chat_template=template_choice)
    if pairs is not None:
        before = dpo.policy_preference_accuracy(policy.model, tokenizer, pairs, max_length)
        extra.update(heldout_pairs=len(pairs), heldout_policy_preference_before=before)
    trainer = KTOTrainer(
        model=policy.model,
        ref_model=policy.ref_model,
        args=training_args,
        train_dataset=rows["train"],
        eval_dataset=rows["validation"],
        processing_class=tokenizer,
        peft_config=policy.peft_config,
        callbacks=run.callbacks(tokenizer, sample_prompts(rows["validation"], tokenizer)),
    )
    run.train(trainer, perplexity=False)
    extra.update(kto.metrics_at_start(trainer.state.log_history))
    if trainer.is_world_process_zero():
        if pairs is not None:
            after = dpo.policy_preference_accuracy(trainer.model, tokenizer, pairs, max_length)
            extra["heldout_policy_preference_after"] = after
        plot_eval_curves(trainer.state.log_history, run.output_dir / REWARD_PLOT, training_args.run_name, kto.PLOT_KEYS)

    def summary(metrics: dict) -> str:
        line = (
            f"held-out reward margin {metrics.get('eval_rewards/margins', 0):.3f}, KL {metrics.get('eval_kl', 0):.3f}"
        )
        if "heldout_policy_preference_after" in metrics:
            line += (
                f" | policy prefers chosen: {metrics['heldout_policy_preference_before']:.2f} -> "
                f"{metrics['heldout_policy_preference_after']:.2f}"
            )
        return line

    return run.finish(trainer, tokenizer, extra, summary)


if __name__ == "__main__":
    main()
