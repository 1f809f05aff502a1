"""Trainer callbacks: throughput in the log, the log written live to the run dir, sample generations at each
evaluation, a per-rank report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hfpipe.rundir import SAMPLES_FILE, TRAIN_LOG


class LogExtrasCallback(TrainerCallback):
    """Adds `tokens_per_second` (training steps only: evaluation and saving excluded) to training logs and
    `eval_perplexity` to evaluation logs, in the printed line and in the log history alike.

    Insert it first in the callback list, so that the progress printer sees what it adds. With
    `tokens_per_step=None` it counts the real (non-padding) tokens the Trainer saw instead
    (`include_num_input_tokens_seen: non_padding`). `perplexity=False` for losses that are not cross-entropy (DPO).
    """

    def __init__(self, tokens_per_step: int | None, perplexity: bool = True) -> None:
        self.tokens_per_step = tokens_per_step
        self.perplexity = perplexity
        self._tokens_seen = 0
        self.train_seconds = 0.0
        self.train_tokens = 0
        self._last_step_end: float | None = None
        self._window = [0.0, 0]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_step_end = time.perf_counter()
        self._tokens_seen = state.num_input_tokens_seen  # non-zero when resuming

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._last_step_end is None:  # restart the clock after an evaluation or a save
            self._last_step_end = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        now = time.perf_counter()
        elapsed = now - self._last_step_end
        if self.tokens_per_step is None:
            tokens = state.num_input_tokens_seen - self._tokens_seen
            self._tokens_seen = state.num_input_tokens_seen
        else:
            tokens = self.tokens_per_step
        self.train_seconds += elapsed
        self.train_tokens += tokens
        self._window[0] += elapsed
        self._window[1] += tokens
        self._last_step_end = now

    def _pause(self, *args: Any, **kwargs: Any) -> None:
        # Time spent evaluating, sampling or saving is not training time.
        self._last_step_end = None

    on_evaluate = _pause
    on_save = _pause

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None:
            return
        extras: dict[str, float] = {}
        if "loss" in logs and self._window[0] > 0:
            extras["tokens_per_second"] = round(self._window[1] / self._window[0], 1)
            self._window = [0.0, 0]
        if "eval_loss" in logs and self.perplexity:
            extras["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        logs.update(extras)
        if state.log_history:  # the Trainer appended a copy of `logs` just before calling us
            state.log_history[-1].update(extras)

    @property
    def tokens_per_second(self) -> float:
        """Mean training tokens per second over the steps this process timed."""
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


class TrainLogCallback(TrainerCallback):
    """Appends each log entry (training, evaluation, the final summary) to the run dir's train_log.jsonl as it is
    logged, so that the curves of a run still training can be read (the Trainer writes its log history only with
    each checkpoint). A resumed run first drops the entries logged after the step it resumes from.

    Put it after `LogExtrasCallback`, whose figures it records too."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        path = Path(args.output_dir) / TRAIN_LOG
        if not state.is_world_process_zero or not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _logged_by(line, state.global_step)]
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        entry = {**logs, "step": state.global_step, "epoch": state.epoch}
        with open(Path(args.output_dir) / TRAIN_LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


def _logged_by(line: str, step: int) -> bool:
    """True for a train_log.jsonl line logged at or before `step` (a torn last line is dropped)."""
    try:
        return json.loads(line).get("step", 0) <= step
    except ValueError:
        return False


def room_for(model: torch.nn.Module, prompt_length: int, max_new_tokens: int) -> int:
    """New tokens that fit after a prompt: generation cannot run past the context the model was built with."""
    context = getattr(model.config, "max_position_embeddings", None)
    return max_new_tokens if context is None else min(max_new_tokens, context - prompt_length)


def generate_samples(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, seed: int
) -> list[dict[str, str]]:
    """Sample a completion per prompt (temperature 0.8, top-k 40), reproducibly and without touching the
    training RNG streams. Completions stop at the model's context length; prompts longer than it are skipped."""
    was_training = model.training
    model.eval()
    samples = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
            prompt_length = inputs["input_ids"].shape[1]
            room = room_for(model, prompt_length, max_new_tokens)
            if room <= 0:
                continue
            output = model.generate(
                **inputs,
                max_new_tokens=room,
                do_sample=True,
                temperature=0.8,
                top_k=40,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            completion = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
            samples.append({"prompt": prompt, "completion": completion})
    model.train(was_training)
    return samples


class SampleCallback(TrainerCallback):
    """Generates from a few prompts at each evaluation; prints them and appends them to samples.jsonl."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self._sampled_step: int | None = None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if not state.is_world_process_zero or model is None or not self.prompts:
            return
        if state.global_step == self._sampled_step:
            return
        self._sampled_step = state.global_step
        samples = generate_samples(model, self.tokenizer, self.prompts, self.max_new_tokens, args.seed)
        write_samples(Path(args.output_dir), state.global_step, samples)


def write_samples(output_dir: Path, step: int, samples: list[dict[str, Any]], shown: int | None = None) -> None:
    """Print samples (the first `shown`, default all) and append them all, tagged with the step, to
    output_dir/samples.jsonl."""
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"\n--- samples at step {step} ---")
    with open(output_dir / SAMPLES_FILE, "a", encoding="utf-8") as handle:
        for index, sample in enumerate(samples):
            if shown is None or index < shown:
                print(f"{sample['prompt']}{sample['completion']}\n")
            handle.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")


class RankReportCallback(TrainerCallback):
    """Prints, on every rank, the optimizer steps taken and a checksum of the weights: ranks of one DDP run
    must agree."""

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if args.world_size <= 1 or model is None:
            return
        with torch.no_grad():
            checksum = sum(float(p.double().abs().sum()) for p in model.parameters())
        print(
            f"[rank {args.process_index}/{args.world_size}] trained {state.global_step} steps, "
            f"weights checksum {checksum:.6f}",
            flush=True,
        )
