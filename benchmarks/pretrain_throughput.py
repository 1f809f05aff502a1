"""Pretrain recipe vs a minimal hand-written PyTorch loop (same model, data, batch, optimizer and precision) and, with
--nanogpt, vs nanoGPT's own train.py run unchanged on the same corpus split.

    python benchmarks/pretrain_throughput.py                      # throughput: 3 alternating pairs, 300 steps
    python benchmarks/pretrain_throughput.py --full --repeats 1   # the config's full run: loss and wall time
    python benchmarks/pretrain_throughput.py --full --repeats 2 --nanogpt /path/to/nanoGPT   # a checkout of it

nanoGPT (github.com/karpathy/nanoGPT, not shipped here) runs its config/train_shakespeare_char.py with the CPU
flags of its README (4x4x128, context 64, batch 12, 2000 iterations, dropout 0, no compile) on train.bin/val.bin
written from this config's train/validation files with its own character encoding. Both final models are then
scored on the same validation characters: the first 240 windows of 64 characters of the validation text (the
recipe's eval blocks hold the same count), mean loss over the 63 predictions of each window. Speed against nanoGPT
is the same statistic for both: the median time of a training step as nanoGPT times an iteration (from one step's end
to the next: data, forward, backward, optimizer, logging), the steps that also evaluate or save left out; the mean
is reported beside it.

Both runs use the recipe's own tokenizer and cached blocks. Tokens/s counts training steps only (evaluation
and saving excluded) for both; wall time is the training phase (steps, evaluations, checkpoints), without
process start-up and data preparation, for both. Writes benchmarks/results/pretrain_throughput[_full].json
and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from readme_table import write_marked_table
from transformers import TrainerCallback, TrainingArguments, get_scheduler, set_seed
from transformers.trainer import DEFAULT_CALLBACKS

from hfpipe.data.files import load_raw_splits
from hfpipe.models.gpt2 import build_gpt2, check_shape
from hfpipe.sections import DataArguments, GPT2ShapeArguments, RunArguments
from hfpipe.train.pretrain import load_blocks, load_tokenizer
from hfpipe.train.pretrain import parse as parse_pretrain

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def handwritten_run(parsed, tokenizer, blocks, eval_every: int | None, save_dir: Path) -> dict:
    """The loop a user would write by hand: AdamW, warmup + schedule, clipping, periodic eval and save."""
    args: TrainingArguments = parsed.get(TrainingArguments)
    shape_args, data_args = parsed.get(GPT2ShapeArguments), parsed.get(DataArguments)
    set_seed(args.seed)
    model = build_gpt2(check_shape(shape_args, data_args.block_size, "bench"), shape_args.dropout, tokenizer)
    model.config._attn_implementation = "sdpa"
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=True,
    )
    steps = args.max_steps
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        args.get_warmup_steps(steps),
        steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    train = blocks["train"].with_format("torch")[:]["input_ids"]
    validation = blocks["validation"].with_format("torch")[:]["input_ids"]
    batch_size = args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=generator)
    train_seconds, best, eval_loss = 0.0, math.inf, math.nan
    wall_start = time.perf_counter()
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        index = order[(step * batch_size) % len(order) :][:batch_size]
        batch = train[index]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - start
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            eval_loss = evaluate(model, validation, args.per_device_eval_batch_size)
            if eval_loss < best:
                best = eval_loss
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, save_dir / "ckpt.pt")
    wall = time.perf_counter() - wall_start
    if not eval_every:
        eval_loss = evaluate(model, validation, args.per_device_eval_batch_size)
    tokens = steps * batch_size * data_args.block_size
    return {"tokens_per_second": tokens / train_seconds, "eval_loss": eval_loss, "train_wall_seconds": wall}


@torch.no_grad()
def evaluate(model: torch.nn.Module, validation: torch.Tensor, batch_size: int) -> float:
    """Mean token loss over the validation blocks, as the Trainer computes it (mean of batch losses)."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in validation.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
NANOGPT_CPU_FLAGS = [  # the "I only have a macbook" line of nanoGPT's README
    "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
    "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
]  # fmt: skip
WINDOWS, WINDOW = 240, 64


def split_texts(parsed) -> dict[str, str]:
    """The config's training and validation text, each file's text joined by a blank line."""
    from hfpipe.data.files import resolve_files

    data_args = parsed.get(DataArguments)
    return {
        split: "\n\n".join(Path(file).read_text(encoding="utf-8") for file in resolve_files(patterns, split, "bench"))
        for split, patterns in (("train", data_args.train_files), ("val", data_args.validation_files))
    }


def nanogpt_run(nanogpt: Path, texts: dict[str, str], work: Path, env: dict[str, str]) -> dict:
    """nanoGPT's train.py, unchanged, on the same split; its ms/iteration and wall time, and its final model's loss
    on the shared validation windows."""
    import pickle
    import re
    import shutil
    import subprocess

    import numpy as np

    for name in NANOGPT_FILES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(nanogpt / name, work / name)
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    chars = sorted(set(texts["train"]) | set(texts["val"]))
    stoi = {char: index for index, char in enumerate(chars)}
    for split, text in texts.items():
        np.array([stoi[char] for char in text], dtype=np.uint16).tofile(data / f"{split}.bin")
    with open(data / "meta.pkl", "wb") as handle:  # the format of nanoGPT's prepare.py, read by its train.py
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, handle)
    start = time.perf_counter()
    output = subprocess.run(
        [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU_FLAGS],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    wall = time.perf_counter() - start
    iteration_ms = {
        int(step): float(ms) for step, ms in re.findall(r"^iter (\d+): loss [0-9.]+, time ([0-9.]+)ms", output, re.M)
    }
    # An iteration at a multiple of eval_interval (250) also evaluates (and may save): left out, as for the recipe.
    training_ms = [ms for step, ms in iteration_ms.items() if step % 250 and step > 1]
    sys.path.insert(0, str(work))
    try:
        from model import GPT, GPTConfig  # nanoGPT's model.py, as copied above
    finally:
        sys.path.pop(0)
    checkpoint = torch.load(work / "out-shakespeare-char" / "ckpt.pt", map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict({key.removeprefix("_orig_mod."): value for key, value in checkpoint["model"].items()})
    windows = validation_windows(texts["val"], lambda text: [stoi[char] for char in text])
    with torch.no_grad():
        model.eval()
        logits, _ = model(windows, windows)  # with targets, nanoGPT returns logits at every position
    return {
        "ms_per_iteration": statistics.median(training_ms),
        "ms_per_iteration_mean": statistics.fmean(training_ms),
        "wall_seconds": wall,
        "own_val_loss": float(re.findall(r"val loss ([0-9.]+)", output)[-1]),
        "shared_val_loss": shifted_loss(logits, windows),
    }


def validation_windows(text: str, encode) -> torch.Tensor:
    """The shared validation windows: the first WINDOWS stretches of WINDOW characters of the validation text."""
    return torch.tensor([encode(text[i * WINDOW : (i + 1) * WINDOW]) for i in range(WINDOWS)])


def shifted_loss(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean cross-entropy of the next-character predictions within each window."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()


def recipe_shared_loss(output_dir: Path, text: str) -> float:
    """The recipe's final model scored on the shared validation windows (its char tokenizer: one id per character)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    windows = validation_windows(text, lambda window: tokenizer.convert_tokens_to_ids(list(window)))
    with torch.no_grad():
        return shifted_loss(model(input_ids=windows).logits, windows)


class StepClock(TrainerCallback):
    """The time from one training step's end to the next one's, as nanoGPT times an iteration (data, forward,
    backward, optimizer, logging); intervals that hold an evaluation or a save are left out."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now

    def _pause(self, *args, **kwargs):
        self._last = None

    on_evaluate = _pause
    on_save = _pause


def recipe_run(config: str, flags: list[str], output_dir: Path) -> dict:
    """Run recipes/pretrain.py in this process and return the same figures as the hand-written loop, and its
    per-step times (StepClock)."""
    spec = importlib.util.spec_from_file_location("recipe_pretrain", ROOT / "recipes" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clock = StepClock()
    DEFAULT_CALLBACKS.append(clock)  # every Trainer built while it is listed gets it
    try:
        metrics = module.main(
            ["--config", config, "--output_dir", str(output_dir), "--overwrite_output_dir", "true", *flags]
        )
    finally:
        DEFAULT_CALLBACKS.remove(clock)
    return {
        "tokens_per_second": metrics["train_tokens_per_second"],
        "eval_loss": metrics["eval_loss"],
        "train_wall_seconds": metrics["train_runtime"],
        "ms_per_step_median": 1000 * statistics.median(clock.seconds),
        "ms_per_step_mean": 1000 * statistics.fmean(clock.seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain/shakespeare_char.yaml")
    parser.add_argument("--steps", type=int, default=300, help="steps per throughput run (ignored with --full)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="run the config's own max_steps with its evaluations")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: also run its train.py (with --full)")
    options = parser.parse_args()
    if options.nanogpt and not (options.full and options.config.endswith("shakespeare_char.yaml")):
        parser.error("--nanogpt compares the full run of configs/pretrain/shakespeare_char.yaml: add --full")

    flags = [] if options.full else ["--max_steps", str(options.steps), "--eval_strategy", "no"]
    parsed = parse_pretrain(["--config", options.config, "--output_dir", "/tmp/unused", *flags])
    args = parsed.get(TrainingArguments)
    run_args = parsed.get(RunArguments)
    raw = load_raw_splits(parsed.get(DataArguments), options.config)
    tokenizer = load_tokenizer(parsed, raw, run_args.smoke)
    blocks = load_blocks(parsed, raw, tokenizer, run_args.smoke)
    eval_every = int(args.eval_steps) if options.full else None

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(options.repeats):
            hand = handwritten_run(parsed, tokenizer, blocks, eval_every, Path(scratch))
            recipe = recipe_run(options.config, flags, Path(scratch) / f"recipe{repeat}")
            runs.append({"handwritten": hand, "recipe": recipe})
            if options.nanogpt:
                texts = split_texts(parsed)
                recipe["shared_val_loss"] = recipe_shared_loss(Path(scratch) / f"recipe{repeat}", texts["val"])
                work = Path(scratch) / f"nanogpt{repeat}"
                runs[-1]["nanogpt"] = nanogpt_run(options.nanogpt, texts, work, {**os.environ})
            print(f"repeat {repeat}: {runs[-1]}", flush=True)

    ratios = [run["recipe"]["tokens_per_second"] / run["handwritten"]["tokens_per_second"] for run in runs]
    result = {
        "config": options.config,
        "mode": "full" if options.full else f"{options.steps} steps, no evaluation",
        "steps": args.max_steps,
        "model_parameters": sum(
            p.numel()
            for p in build_gpt2(
                check_shape(parsed.get(GPT2ShapeArguments), parsed.get(DataArguments).block_size, "bench"),
                0.0,
                tokenizer,
            ).parameters()
        ),
        "precision": "bf16" if args.bf16 else "fp32",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runs": runs,
        "median_tokens_per_second_ratio": statistics.median(ratios),
        "median_recipe_eval_loss": statistics.median(run["recipe"]["eval_loss"] for run in runs),
        "median_handwritten_eval_loss": statistics.median(run["handwritten"]["eval_loss"] for run in runs),
        "median_wall_ratio": statistics.median(
            run["recipe"]["train_wall_seconds"] / run["handwritten"]["train_wall_seconds"] for run in runs
        ),
    }
    if options.nanogpt:
        result["median_recipe_over_nanogpt_speed"] = statistics.median(
            run["nanogpt"]["ms_per_iteration"] / run["recipe"]["ms_per_step_median"] for run in runs
        )
        result["median_shared_val_loss"] = {
            name: statistics.median(run[name]["shared_val_loss"] for run in runs) for name in ("recipe", "nanogpt")
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "pretrain_throughput_full.json" if options.full else "pretrain_throughput.json"
    name = "pretrain_vs_nanogpt.json" if options.nanogpt else name
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if options.nanogpt:
        write_nanogpt_table(result)
    else:
        write_table()


def write_nanogpt_table(result: dict) -> None:
    """The recipe against nanoGPT in benchmarks/README.md."""
    median = lambda name, key: statistics.median(run[name][key] for run in result["runs"])  # noqa: E731
    table = "\n".join(
        [
            f"{result['config']}, full run, OMP_NUM_THREADS={result['omp_num_threads']}, {len(result['runs'])} "
            f"alternating rounds. Recipe / nanoGPT speed: **{result['median_recipe_over_nanogpt_speed']:.2f}x**",
            "",
            "| contender | ms per training step, median | mean | wall s (process) | val loss, shared windows "
            "| val loss, own report |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| recipes/pretrain.py | {median('recipe', 'ms_per_step_median'):.1f} | "
            f"{median('recipe', 'ms_per_step_mean'):.1f} | "
            f"{median('recipe', 'train_wall_seconds'):.0f} (training phase) | "
            f"{median('recipe', 'shared_val_loss'):.4f} | {median('recipe', 'eval_loss'):.4f} |",
            f"| nanoGPT train.py | {median('nanogpt', 'ms_per_iteration'):.1f} | "
            f"{median('nanogpt', 'ms_per_iteration_mean'):.1f} | "
            f"{median('nanogpt', 'wall_seconds'):.0f} | "
            f"{median('nanogpt', 'shared_val_loss'):.4f} | {median('nanogpt', 'own_val_loss'):.4f} |",
        ]
    )
    write_marked_table("pretrain-nanogpt-table", table)


def write_table() -> None:
    """Rewrite the results table in benchmarks/README.md from every JSON result."""
    rows = []
    for path in sorted(RESULTS.glob("pretrain_throughput*.json")):
        r = json.loads(path.read_text())
        recipe_tps = statistics.median(run["recipe"]["tokens_per_second"] for run in r["runs"])
        hand_tps = statistics.median(run["handwritten"]["tokens_per_second"] for run in r["runs"])
        rows.append(
            f"| {path.name} | {r['mode']} | {r['precision']}, OMP_NUM_THREADS={r['omp_num_threads']} | "
            f"{len(r['runs'])} | {recipe_tps:,.0f} | {hand_tps:,.0f} | {r['median_tokens_per_second_ratio']:.2f} | "
            f"{r['median_recipe_eval_loss']:.4f} / {r['median_handwritten_eval_loss']:.4f} | "
            f"{r['median_wall_ratio']:.2f} |"
        )
    table = "\n".join(
        [
            "| result | run | precision, threads | pairs | recipe tok/s | hand-written tok/s | ratio (median) "
            "| eval loss recipe / hand | wall-time ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    write_marked_table("pretrain-table", table)


if __name__ == "__main__":
    sys.exit(main())
