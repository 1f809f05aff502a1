"""Pretrain recipe vs a minimal hand-written PyTorch loop: same model, data, batch, optimizer and precision.

    python benchmarks/pretrain_throughput.py                      # throughput: 3 alternating pairs, 300 steps
    python benchmarks/pretrain_throughput.py --full --repeats 1   # the config's full run: loss and wall time

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
from transformers import TrainingArguments, get_scheduler, set_seed

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


def recipe_run(config: str, flags: list[str], output_dir: Path) -> dict:
    """Run recipes/pretrain.py in this process and return the same figures as the hand-written loop."""
    spec = importlib.util.spec_from_file_location("recipe_pretrain", ROOT / "recipes" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(
        ["--config", config, "--output_dir", str(output_dir), "--overwrite_output_dir", "true", *flags]
    )
    return {
        "tokens_per_second": metrics["train_tokens_per_second"],
        "eval_loss": metrics["eval_loss"],
        "train_wall_seconds": metrics["train_runtime"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain/shakespeare_char.yaml")
    parser.add_argument("--steps", type=int, default=300, help="steps per throughput run (ignored with --full)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="run the config's own max_steps with its evaluations")
    options = parser.parse_args()

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
            print(f"repeat {repeat}: recipe {recipe} | hand-written {hand}", flush=True)

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
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "pretrain_throughput_full.json" if options.full else "pretrain_throughput.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    write_table()


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
