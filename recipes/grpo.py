"""Reinforcement learning with verifiable rewards: TRL's GRPOTrainer, full fine-tuning or LoRA.

    accelerate launch recipes/grpo.py --config configs/grpo/smollm2_arithmetic.yaml

Rows are prompts (prompt, instruction or messages) with any other columns the rewards read (e.g. `answer`). The
rewards are a weighted YAML list: regex, exact or numeric match against a column, a length target, ends with EOS, a
reward model dir, or your own `module:function`. Held-out prompts are answered greedily and scored by the same rewards
before and after training. Any YAML key can be overridden on the command line; `--smoke` runs a few steps; running
the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import hfpipe  # noqa: F401 (first: it quiets the libraries' start-up noise before they load)

# isort: split
from collections.abc import Sequence

from trl import GRPOConfig

from hfpipe.data import count_prompt_tokens, load_splits, prompt_preparer
from hfpipe.errors import exit_on_user_error
from hfpipe.rundir import REWARD_PLOT
from hfpipe.train import grpo, load_model, load_tokenizer, lora_config, start_run
from hfpipe.train.callbacks import write_samples
from hfpipe.train.grpo_trainer import PrefixSharingGRPOTrainer
from hfpipe.train.plots import plot_training_rewards
from hfpipe.train.rewards import probe_user_functions, required_columns


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; return the final metrics (empty on non-main processes)."""
    parsed = grpo.parse(argv)
    training_args, entries = parsed.get(GRPOConfig), grpo.reward_entries(parsed)
    with training_args.main_process_first(desc="loading the tokenizer and data"):
        tokenizer, template_choice, model_path = load_tokenizer(parsed)
        prepare = prompt_preparer(required_columns(entries))
        splits, table = load_splits(parsed, tokenizer, parsed.get(grpo.RunArguments).smoke, prepare=prepare,
                                    count_tokens=count_prompt_tokens(tokenizer))  # fmt: skip
    probe_user_functions(entries, splits["train"])  # before anything is written or loaded
    run = start_run("grpo", parsed)
    funcs, training_args.reward_weights = grpo.reward_funcs(parsed, tokenizer, training_args.device)
    model = load_model(parsed, model_path, tokenizer)
    print(table)
    print(f"{model.num_parameters():,} parameters | chat template: {template_choice} | rewards: "
          f"{', '.join(f'{e.name} x{e.weight:g}' for e in entries)} | {run.device}")  # fmt: skip
    heldout = grpo.heldout_rows(splits["validation"], parsed.get(grpo.GRPOArguments).heldout_prompts)
    score = lambda policy: grpo.heldout_scores(  # noqa: E731
        policy, tokenizer, heldout, funcs, entries, training_args.max_completion_length,
        training_args.per_device_eval_batch_size,
    )  # fmt: skip
    before, answers = score(model)
    trainer = PrefixSharingGRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=lora_config(parsed, model),
    )
    if trainer.is_world_process_zero() and run.resume_from is None:
        write_samples(run.output_dir, 0, answers, shown=2)
    run.train(trainer, perplexity=False)
    extra = {"train_rows": len(splits["train"]), "validation_rows": len(splits["validation"]), "data_sources": table}
    extra.update(chat_template=template_choice, heldout_prompts=len(heldout))
    extra.update({f"heldout_{key}_before": value for key, value in before.items()})
    if trainer.is_world_process_zero():
        after, answers = score(trainer.model)
        extra.update({f"heldout_{key}_after": value for key, value in after.items()})
        write_samples(run.output_dir, trainer.state.global_step, answers, shown=2)
        plot_training_rewards(trainer.state.log_history, run.output_dir / REWARD_PLOT, training_args.run_name,
                              {"before": before["reward"], "after": after["reward"]})  # fmt: skip

    def summary(metrics: dict) -> str:
        accuracy = (
            f" | held-out accuracy {before[grpo.ACCURACY]:.2f} -> {metrics['heldout_accuracy_after']:.2f}"
            if grpo.ACCURACY in before
            else ""
        )
        return f"held-out reward {before['reward']:.3f} -> {metrics['heldout_reward_after']:.3f}{accuracy}"

    return run.finish(trainer, tokenizer, extra, summary)


if __name__ == "__main__":
    main()
