"""Every shipped recipe config trains: each runs for 2 steps from a clean state, as a user runs it (its recipe in its
own process, from the repo root), writes metrics.json at step 2 and changes the weights. A config that starts from
an earlier stage's output (`model_name_or_path: outputs/...`) starts from the 2-step run of the shipped config that
writes that output, as the pipeline hands it on; the SmolLM2 configs convert the GGUF once into the session's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from shipped_runs import STEPS, ShippedRuns, settings_of, stages_before
from test_config import RECIPE_CONFIGS, shakespeare_prepared  # noqa: F401 (an autouse fixture: it applies here too)

from hfpipe.rundir import METRICS_FILE
from hfpipe.stages import stage_named_in

ADAPTER_WEIGHTS, MODEL_WEIGHTS = "adapter_model.safetensors", "model.safetensors"


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
