"""Load a trained model for the after-training tools: a full model dir, an adapter dir (loaded onto its base),
a .gguf file or package-shipped model, or a Hub id; merge an adapter into its base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfpipe.errors import ConfigError
from hfpipe.models.pretrained import load_causal_lm, load_reward_model, load_tokenizer_from, looks_local
from hfpipe.rundir import ADAPTER_CONFIG, GENERATION_CONFIG, MODEL_CONFIG, adapter_base, stage_of
from hfpipe.stages import STAGES


@dataclass
class LoadedModel:
    """A model ready for generation, with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str  # what the user named
    base: str | None  # the base model dir or id when `path` is an adapter


def check_model_source(name: str) -> str:
    """Return the loadable form of `name` (a .gguf or package-shipped model is converted once); stop with one line
    when a local path is missing, is not a model dir, or is an adapter whose base cannot be found."""
    from hfpipe.data.files import cache_root
    from hfpipe.models.gguf import resolve_model_path

    resolved = resolve_model_path(name, cache_root())
    if not looks_local(resolved):
        return resolved  # a Hub id: from_pretrained reports what is wrong with it
    path = Path(resolved).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{name}: no such model directory. Give a run's output dir, a .gguf file or a Hub id.")
    stage = STAGES.get(stage_of(path) or "")
    if stage is not None and not stage.generates:
        raise ConfigError(
            f"{name}: a {stage.name} run scores text ({stage.card_title.lower()}); it does not generate. Give a run "
            "that generates (pretrain, sft, dpo, ...)."
        )
    base = adapter_base(path)
    if base is None:
        if not (path / MODEL_CONFIG).is_file():
            raise ConfigError(f"{name}: not a model dir (no config.json or {ADAPTER_CONFIG}).")
    elif looks_local(base) and not Path(base).expanduser().is_dir():
        raise ConfigError(
            f"{name}: the adapter's base model '{base}' (base_model_name_or_path in {ADAPTER_CONFIG}) is not a "
            "directory. Restore the base model there or edit that field."
        )
    return str(path)


def load_for_inference(
    name: str, dtype: str | None = None, device: str | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    """Load a model and tokenizer for generation or evaluation, in eval mode on `device` (GPU when present).

    An adapter dir is loaded onto its base and merged, so generation runs at the base model's speed.
    """
    path = check_model_source(name)
    base = adapter_base(Path(path)) if looks_local(path) else None
    tokenizer = load_inference_tokenizer(path, trust_remote_code)
    if base is None:
        model = load_causal_lm(path, "main", dtype, None, trust_remote_code)
    else:
        model = merge_adapter(path, base, tokenizer, dtype, trust_remote_code)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return LoadedModel(model, tokenizer, name, base)


def load_inference_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model source (as check_model_source returns it), with a pad token for batches."""
    tokenizer = load_tokenizer_from(path, "model", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batched generation needs a pad; GPT-2 ships none
    return tokenizer


def load_reward_scorer(name: str, device: str | torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reward model dir (full, or a LoRA adapter merged onto its base) in eval mode on `device`, and the tokenizer
    it was trained with (pad set: its score is read at the last token before padding)."""
    from peft import PeftModel

    base = adapter_base(Path(name))
    model = load_reward_model(str(base or name), "main", None, "sdpa", False)
    if base is not None:
        model = PeftModel.from_pretrained(model, name).merge_and_unload()
    tokenizer = load_tokenizer_from(name, "reward model", "main", False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def load_scorer_for_inference(name: str, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """A reward model run (full, or a LoRA adapter merged onto its base) for evaluation, loaded with
    `load_reward_scorer` on `device` (GPU when present), cast to `dtype` when given; a missing dir, config or base
    is one line before anything loads."""
    torch_dtype = None
    if dtype not in (None, "auto"):
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ConfigError(f"--dtype: '{dtype}' is not a floating-point dtype (float32, bfloat16, float16).")
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{name}: no such reward model directory. Give a recipes/reward.py output dir.")
    base = adapter_base(path)
    if base is None and not (path / MODEL_CONFIG).is_file():
        raise ConfigError(f"{name}: not a model dir (no config.json or {ADAPTER_CONFIG}).")
    if base is not None and looks_local(base) and not Path(base).expanduser().is_dir():
        raise ConfigError(
            f"{name}: the adapter's base model '{base}' (base_model_name_or_path in {ADAPTER_CONFIG}) is not a "
            "directory. Restore the base model there or edit that field."
        )
    model, tokenizer = load_reward_scorer(str(path), device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_dtype is not None:
        model.to(torch_dtype)
    return LoadedModel(model, tokenizer, name, base)


def merge_adapter(
    adapter_dir: str, base: str, tokenizer: PreTrainedTokenizerBase, dtype: str | None, trust_remote_code: bool
) -> PreTrainedModel:
    """Load `base` (unquantized, so that a QLoRA adapter merges too), give it the rows the adapter's tokenizer
    added, and merge the adapter into it."""
    from peft import PeftModel

    from hfpipe.data.chat_templates import fit_model_to_tokenizer

    model = load_causal_lm(base, "main", dtype, None, trust_remote_code)
    fit_model_to_tokenizer(model, tokenizer)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def save_merged_model(adapter_dir: Path, destination: Path) -> Path:
    """Merge the adapter in `adapter_dir` onto its base and save the full model (fp32) with the adapter's tokenizer
    and generation config to `destination`."""
    from transformers import GenerationConfig

    base = adapter_base(adapter_dir)
    if base is None:
        raise ConfigError(f"{adapter_dir}: no {ADAPTER_CONFIG}: there is no adapter to merge.")
    tokenizer = load_tokenizer_from(str(adapter_dir), "model")
    merged = merge_adapter(str(adapter_dir), base, tokenizer, "float32", trust_remote_code=False)
    if (adapter_dir / GENERATION_CONFIG).is_file():
        merged.generation_config = GenerationConfig.from_pretrained(adapter_dir)
    merged.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    return destination
