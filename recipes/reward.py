"""Reward model training with TRL's RewardTrainer: a one-number head on a causal LM, full or LoRA.

    accelerate launch recipes/reward.py --config configs/reward/quickstart.yaml

Rows are preference pairs in every format recipes/dpo.py reads; the model learns to score chosen above rejected.
Its output dir is a reward for recipes/grpo.py. Any YAML key can be overridden on the command line; `--smoke` runs a
few steps; running the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import hfpipe  # noqa: F401 (first: it quiets the libraries' start-up noise before they load)

# isort: split
from collections.abc import Sequence

from trl import RewardConfig, RewardTrainer

from hfpipe.data import count_pair_tokens, load_splits, preference_preparer
from hfpipe.errors import exit_on_user_error
from hfpipe.rundir import REWARD_PLOT
from hfpipe.train import load_tokenizer, lora_config, reward, start_run
from hfpipe.train.plots import plot_rewards


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = reward.parse(argv)
    training_args = parsed.get(RewardConfig)
    max_length = training_args.max_length
    run = start_run("reward", parsed)
    with training_args.main_process_first(desc="loading the tokenizer and data"):
        tokenizer, template_choice, model_path = load_tokenizer(parsed)
        prepare, count = preference_preparer(tokenizer, max_length), count_pair_tokens(tokenizer, max_length)
        splits, table = load_splits(parsed, tokenizer, run.run_args.smoke, prepare=prepare, count_tokens=count)
    model = reward.load_scorer(parsed, model_path, tokenizer)
    print(table)
    print(f"{model.num_parameters():,} parameters | chat template: {template_choice} | {run.device}")
    before = reward.pair_accuracy(model, tokenizer, splits["validation"])
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        peft_config=lora_config(parsed, model),
    )
    run.train(trainer, perplexity=False)
    extra = {"train_rows": len(splits["train"]), "validation_rows": len(splits["validation"]), "data_sources": table}
    extra.update(chat_template=template_choice, **reward.accuracy_at_start(trainer.state.log_history))
    extra.update({f"heldout_pair_{key}_before": value for key, value in before.items()})
    if trainer.is_world_process_zero():
        after = reward.pair_accuracy(trainer.model, tokenizer, splits["validation"])
        extra.update({f"heldout_pair_{key}_after": value for key, value in after.items()})
        plot = run.output_dir / REWARD_PLOT
        plot_rewards(trainer.state.log_history, plot, training_args.run_name, reward.ACCURACY, reward.MARGIN)

    def summary(metrics: dict) -> str:
        return (
            f"held-out pairs scored chosen above rejected: {before['accuracy']:.2f} -> "
            f"{metrics['heldout_pair_accuracy_after']:.2f}, margin {metrics['heldout_pair_margin_after']:.3f}"
        )

    return run.finish(trainer, tokenizer, extra, summary)


if __name__ == "__main__":
    main()
