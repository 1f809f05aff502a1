"""DPO memory and speed: `trl dpo` as its docs show (full fine-tuning, a reference copy) vs recipes/dpo.py with
hfpipe's default for the same model.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dpo_memory.py                 # SmolLM2-135M, 3 alternating rounds
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dpo_memory.py --model gpt2-23m

Same preference rows (the shipped set, prompts as one user turn of the model's chat template), batch 4,
max_length 128 (short lengths: weights and optimizer state dominate memory), learning rate 5e-6, no evaluation.
Contenders: `trl dpo` with the YAML a user writes from TRL's docs plus the `use_cpu: true` it needs here; hfpipe's
default for the model (configs/dpo/smollm2_lora.yaml's LoRA: the base with the adapter disabled is the
reference); and hfpipe with full fine-tuning (reference log-probs precomputed). Reports peak RSS of the process
tree, optimizer steps per second over the training phase, and seconds before the first step. Writes
benchmarks/results/dpo_memory_<model>.json and a table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from readme_table import write_marked_table
from sft_throughput import run_measured  # the same peak-RSS sampler

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BATCH, MAX_LENGTH, LR = 4, 128, 5e-6


def build_model(name: str, work: Path) -> Path:
    """The model dir: SmolLM2-135M-Instruct converted from the shipped GGUF, or a 23M-parameter GPT-2 from config
    (an 8k BPE trained on the corpus, the chatml template: both render the rows with a chat template)."""
    from hfpipe.data.files import cache_root
    from hfpipe.models.gguf import resolve_model_path

    if name == "smollm2-135m":
        return Path(resolve_model_path("smollm2-135m-instruct", cache_root()))
    from transformers import set_seed

    from hfpipe.data.chat_templates import apply_chat_template_choice
    from hfpipe.data.files import load_raw_splits
    from hfpipe.data.text_blocks import iter_texts
    from hfpipe.data.tokenizers import train_bpe
    from hfpipe.models.gpt2 import build_gpt2
    from hfpipe.sections import DataArguments

    raw = load_raw_splits(DataArguments(train_files=[str(ROOT / "data/shakespeare/train/*.txt")]), "bench")
    tokenizer = train_bpe(iter_texts(raw["train"]), 8192)
    apply_chat_template_choice("chatml", tokenizer)
    set_seed(0)
    model = build_gpt2({"n_layer": 6, "n_head": 8, "n_embd": 512, "n_positions": 256}, 0.0, tokenizer)
    target = work / "gpt2-23m"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    print(f"gpt2-23m: {model.num_parameters():,} parameters", flush=True)
    return target


def write_rows(work: Path) -> Path:
    """The shipped training pairs as TRL's conversational prompt/chosen/rejected rows."""
    rows = [json.loads(line) for line in (ROOT / "data/preferences/train.jsonl").read_text().splitlines()]
    data = work / "rows"
    data.mkdir()
    with (data / "train.jsonl").open("w") as out:
        for row in rows:
            prompt = row.get("prompt", row.get("instruction"))
            out.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}],
                    }
                )
                + "\n"
            )
    return data


def figures(out: Path, wall: float, peak: int, output: str, steps: int) -> dict[str, float]:
    """Steps/s over the training phase, seconds before it, and peak RSS."""
    import re

    runtime = float(re.findall(r"'train_runtime': '?([0-9.]+)", output)[-1])
    return {
        "steps_per_second": steps / runtime,
        "seconds_outside_training": wall - runtime,
        "peak_rss_mb": peak / 2**20,
    }


def trl_run(model_dir: Path, data_dir: Path, out: Path, env: dict[str, str], steps: int) -> dict[str, float]:
    """`trl dpo` as its docs show: full fine-tuning, the reference a second copy of the model."""
    config = out.parent / "trl.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\ndataset_name: {data_dir}\noutput_dir: {out}\n"
        f"max_length: {MAX_LENGTH}\nper_device_train_batch_size: {BATCH}\nmax_steps: {steps}\nlearning_rate: {LR}\n"
        "save_strategy: 'no'\nreport_to: none\nuse_cpu: true\n"
    )
    wall, peak, output = run_measured([str(Path(sys.executable).parent / "trl"), "dpo", "--config", str(config)], env)
    return figures(out, wall, peak, output, steps)


def hfpipe_run(
    model_dir: Path, data_dir: Path, out: Path, env: dict[str, str], steps: int, extra: str
) -> dict[str, float]:
    """recipes/dpo.py with hfpipe's defaults plus `extra`."""
    config = out.parent / "hfpipe.yaml"
    config.write_text(
        f"# accelerate launch recipes/dpo.py --config {config}\nmodel_name_or_path: {model_dir}\n"
        f"train_files: [{data_dir}/train.jsonl]\noutput_dir: {out}\nmax_length: {MAX_LENGTH}\n"
        f"per_device_train_batch_size: {BATCH}\nmax_steps: {steps}\nlearning_rate: {LR}\n"
        "eval_strategy: 'no'\neval_on_start: false\nsave_strategy: 'no'\nskip_bad_rows: true\n"
        "sample_max_new_tokens: 4\n" + extra
    )
    wall, peak, output = run_measured([sys.executable, str(ROOT / "recipes" / "dpo.py"), "--config", str(config)], env)
    return figures(out, wall, peak, output, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2-135m", "gpt2-23m"], default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    options = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "2")
    lora = "use_peft: true\nlora_r: 16\nlora_alpha: 32\nlora_target_modules: all-linear\n"
    contenders = {
        "trl dpo (docs: full, reference copy)": lambda *a: trl_run(*a),
        "hfpipe default (LoRA, adapter disabled as reference)": lambda *a: hfpipe_run(*a, lora),
        "hfpipe full (precomputed reference)": lambda *a: hfpipe_run(*a, ""),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir, data_dir = build_model(options.model, work), write_rows(work)
        for repeat in range(options.repeats):
            for index, (name, run) in enumerate(contenders.items()):
                out = work / f"r{repeat}-{index}" / "out"
                out.parent.mkdir(parents=True)
                runs[name].append(run(model_dir, data_dir, out, env, options.steps))
                print(f"round {repeat}: {name}: {runs[name][-1]}", flush=True)
    trl, ours = runs[next(iter(contenders))], runs[list(contenders)[1]]
    result = {
        "model": options.model,
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "settings": {"steps": options.steps, "batch": BATCH, "max_length": MAX_LENGTH, "learning_rate": LR},
        "runs": runs,
        "median_rss_ratio_default_over_trl": statistics.median(
            o["peak_rss_mb"] / t["peak_rss_mb"] for o, t in zip(ours, trl, strict=True)
        ),
        "median_speed_ratio_default_over_trl": statistics.median(
            o["steps_per_second"] / t["steps_per_second"] for o, t in zip(ours, trl, strict=True)
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"dpo_memory_{options.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    write_table(result, f"dpo-{options.model}-table")


def write_table(result: dict, marker: str) -> None:
    """Rewrite the table between `<!-- marker -->` comments in benchmarks/README.md (appended when missing)."""
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    rows = [
        f"| {name} | {median(runs, 'peak_rss_mb'):,.0f} | {median(runs, 'steps_per_second'):.3f} | "
        f"{median(runs, 'seconds_outside_training'):.1f} |"
        for name, runs in result["runs"].items()
    ]
    table = "\n".join(
        [
            f"{result['model']}, OMP_NUM_THREADS={result['omp_num_threads']}, "
            f"{len(next(iter(result['runs'].values())))} alternating rounds of {result['settings']['steps']} steps. "
            f"Default / TRL: peak RSS **{result['median_rss_ratio_default_over_trl']:.2f}x**, steps/s "
            f"**{result['median_speed_ratio_default_over_trl']:.2f}x** (medians of per-round ratios)",
            "",
            "| contender | peak RSS MB | steps/s | s outside training |",
            "| --- | --- | --- | --- |",
            *rows,
        ]
    )
    write_marked_table(marker, table, section_if_missing="")


if __name__ == "__main__":
    main()
