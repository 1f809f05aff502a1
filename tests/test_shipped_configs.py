"""Every shipped recipe config trains: each runs for 2 steps from a clean state, as a user runs it (its recipe in its
own process, from the repo root), writes metrics.json at step 2 and changes the weights. A config that starts from
an earlier stage's output (`model_name_or_path: outputs/...`) starts from the 2-step run of the shipped config that
writes that output, as the pipeline hands it on; the SmolLM2 configs convert the GGUF once into the session's cache."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT
from safetensors.torch import load_file
from test_config import RECIPE_CONFIGS, shakespeare_prepared  # noqa: F401 (an autouse fixture: it applies here too)

from hfpipe.rundir import METRICS_FILE
from hfpipe.stages import stage_named_in

ADAPTER_WEIGHTS, MODEL_WEIGHTS = "adapter_model.safetensors", "model.safetensors"
STEPS = 2
SHORT = [
    *("--max_steps", str(STEPS), "--eval_steps", str(STEPS), "--save_steps", str(STEPS)),
    *("--logging_steps", "1", "--sample_max_new_tokens", "4"),
]
# Only where the config as written cannot take 2 steps in CI: the model and data stay the config's own.
OVERRIDES = {
    # 64 sequences of 1024 tokens per step through a 124M model (8 x 8 accumulated), 20 s each on 2 cores: over 20
    # minutes a step, and 256 held-out blocks.
    "configs/pretrain/gpt2_small.yaml": [
        *("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"),
        *("--max_eval_samples", "2", "--per_device_eval_batch_size", "2"),
    ],
    # 100 held-out prompts answered greedily before and after, by a 135M model.
    "configs/grpo/smollm2_arithmetic.yaml": ["--heldout_prompts", "8"],
}
# A run stuck for this long is hung, not slow (the slowest config takes minutes).
TIMEOUT_SECONDS = 3600


@cache
def settings_of(config: Path) -> dict[str, Any]:
    return yaml.safe_load(config.read_text(encoding="utf-8")) or {}


def writer_of(output: str, config: Path) -> Path:
    """The shipped config whose output_dir is `output` (an outputs/... dir `config` reads)."""
    writers = [other for other in RECIPE_CONFIGS if settings_of(other).get("output_dir") == output]
    assert writers, f"{config.relative_to(ROOT)} reads {output}, which no shipped config writes"
    return writers[0]


def start_of(config: Path) -> Path | None:
    """The shipped config whose output `config` starts from (`model_name_or_path: outputs/...`), if any."""
    name = str(settings_of(config).get("model_name_or_path", ""))
    return writer_of(name, config) if name.startswith("outputs/") else None


def reward_models_of(config: Path) -> dict[str, Path]:
    """The shipped configs that write the reward model dirs a GRPO config's rewards read (`model: outputs/...`)."""
    entries = settings_of(config).get("rewards") or []
    dirs = [entry["model"] for entry in entries if str(entry.get("model", "")).startswith("outputs/")]
    return {name: writer_of(name, config) for name in dirs}


def stages_before(config: Path) -> int:
    needed = [start_of(config), *reward_models_of(config).values()]
    return max((1 + stages_before(other) for other in needed if other is not None), default=0)


@dataclass
class ShippedRun:
    """One config's 2-step run: where it wrote, the model dir it started from (None: from scratch or a named
    model), and how it went."""

    config: Path
    output_dir: Path
    start: Path | None
    returncode: int
    output: str

    def failure(self) -> str:
        return f"{self.config.relative_to(ROOT)} exited {self.returncode}:\n{self.output[-4000:]}"


class ShippedRuns:
    """Each config runs once per session: a run that another config starts from is reused, not repeated."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[Path, ShippedRun] = {}

    def get(self, config: Path) -> ShippedRun:
        if config not in self.runs:
            start = start_of(config)
            start_dir = None
            if start is not None:
                before = self.get(start)
                assert before.returncode == 0, f"the run this config starts from failed: {before.failure()}"
                start_dir = before.output_dir
            self.runs[config] = self._run(config, start_dir, self._with_reward_models(config))
        return self.runs[config]

    def _with_reward_models(self, config: Path) -> Path:
        """`config` itself, or a copy whose reward model dirs are the 2-step runs of the configs that write them."""
        readers = reward_models_of(config)
        if not readers:
            return config
        text = config.read_text(encoding="utf-8")
        for name, writer in readers.items():
            before = self.get(writer)
            assert before.returncode == 0, f"the reward model this config reads failed: {before.failure()}"
            text = text.replace(f"model: {name}", f"model: {before.output_dir}")
        copy = self.root / f"{config.stem}-with-reward-models.yaml"
        copy.write_text(text, encoding="utf-8")
        return copy

    def _run(self, config: Path, start: Path | None, config_file: Path) -> ShippedRun:
        relative = str(config.relative_to(ROOT))
        output_dir = self.root / relative.removesuffix(".yaml").replace("/", "-")
        recipe = f"recipes/{stage_named_in(config)}.py"
        command = [sys.executable, recipe, "--config", str(config_file), "--output_dir", str(output_dir), *SHORT]
        command += OVERRIDES.get(relative, [])
        if start is not None:
            command += ["--model_name_or_path", str(start)]
        result = subprocess.run(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_SECONDS
        )
        return ShippedRun(config, output_dir, start, result.returncode, result.stdout)


@pytest.fixture(scope="session")
def shipped_runs(tmp_path_factory: pytest.TempPathFactory) -> ShippedRuns:
    return ShippedRuns(tmp_path_factory.mktemp("shipped"))


def initial_weights(run: Path, seed: int) -> dict[str, torch.Tensor]:
    """A from-scratch run's weights before its first step: the recipe seeds, then builds the model its config.json
    describes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run)).state_dict()


def assert_trained_from(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], learning_rate: float) -> None:
    """Some weight moved, and none further than 2 Adam steps can move it: each step moves a weight by at most about
    the learning rate, so a different starting point (a wrongly rebuilt initialisation) cannot pass."""
    added = sorted(set(after) - set(before))
    assert all(name.startswith("score.") for name in added), f"weights not in the start: {added}"  # a reward head
    moved = []
    for name, tensor in after.items():
        if name in added:
            continue
        change = (tensor.float() - before[name].float()).abs().max().item()
        assert change <= 1.5 * STEPS * learning_rate, f"{name} moved {change:.3g}, beyond {STEPS} steps' reach"
        moved.append(change > 0)
    assert any(moved), "no weight changed"


@pytest.mark.parametrize(
    "config",
    sorted(RECIPE_CONFIGS, key=lambda path: (stages_before(path), path)),
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_shipped_config_trains_for_two_steps(config: Path, shipped_runs: ShippedRuns) -> None:
    run = shipped_runs.get(config)
    assert run.returncode == 0, run.failure()
    metrics = json.loads((run.output_dir / METRICS_FILE).read_text())
    assert metrics["global_step"] == STEPS and metrics["stage"] == stage_named_in(config)
    if (run.output_dir / ADAPTER_WEIGHTS).is_file():
        adapter = load_file(run.output_dir / ADAPTER_WEIGHTS)
        lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
        assert lora_b, sorted(adapter)
        unmoved = [name for name, tensor in lora_b.items() if not tensor.abs().sum() > 0]
        assert not unmoved, f"LoRA B matrices still at their zero start: {unmoved[:3]}"
        return
    training_args = torch.load(run.output_dir / "training_args.bin", weights_only=False)
    if run.start is not None:
        before = load_file(run.start / MODEL_WEIGHTS)
    else:
        assert "model_name_or_path" not in settings_of(config), "a full fine-tune of a named model: compare with it"
        before = initial_weights(run.output_dir, training_args.seed)
    assert_trained_from(before, load_file(run.output_dir / MODEL_WEIGHTS), training_args.learning_rate)
