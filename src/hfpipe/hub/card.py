"""The model card pushed as README.md: Hub metadata (base model, datasets, tags) and how to use the model, then the
run's report (results, resolved config, data sources and shares, plots, samples, versions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from hfpipe import __version__
from hfpipe.config import public_settings
from hfpipe.hub.files import ADAPTER_SUBFOLDER, Upload
from hfpipe.models.pretrained import looks_local
from hfpipe.rundir import CONFIG_FILE, stage_of
from hfpipe.train.report import markdown_sections, report_sections

FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})  # `datasets` loaders of local files
UPLOADED = {
    "model": "the full model",
    "adapter": "the LoRA adapter (load it onto its base)",
    "merged": "the LoRA adapter merged into its base (a full model)",
    "both": f"the merged model at the root and the LoRA adapter in `{ADAPTER_SUBFOLDER}/`",
}


def hub_id_of(name: str | None) -> str | None:
    """The Hub id a config's model_name_or_path stands for: a Hub id as is, a package-shipped GGUF model as the
    model it was converted from, None for a local dir or a from-scratch model."""
    from hfpipe.models.gguf import PACKAGED_MODELS

    if not name:
        return None
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name].hub_id
    return None if looks_local(name) else name


def hub_datasets(settings: dict[str, Any]) -> list[str]:
    """The Hub datasets a run trained on (local files are listed in the card's data section instead)."""
    names = [settings.get("dataset_name")]
    names += [entry.get("path") for entry in settings.get("datasets") or [] if isinstance(entry, dict)]
    return [name for name in dict.fromkeys(names) if name and not looks_local(name) and name not in FILE_BUILDERS]


def usage(repo_id: str, kind: str, base: str | None, task: str = "CausalLM") -> str:
    """A short Python snippet that loads the pushed model (`task`: CausalLM, or SequenceClassification for a scorer)."""
    if kind == "adapter":
        return (
            f"from peft import AutoPeftModelFor{task}\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelFor{task}.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    snippet = (
        f"from transformers import AutoModelFor{task}, AutoTokenizer\n\n"
        f'model = AutoModelFor{task}.from_pretrained("{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
    )
    if kind == "both":
        snippet += (
            "\n\n# The adapter alone, onto its base:\nfrom peft import PeftModel\n\n"
            f'base = AutoModelFor{task}.from_pretrained("{base}")\n'
            f'adapted = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{ADAPTER_SUBFOLDER}")'
        )
    return snippet


def model_card(run_dir: Path, repo_id: str, upload: Upload) -> ModelCard:
    """Build the card of a finished run pushed to `repo_id` (no secrets: the config is the saved, public one)."""
    from hfpipe.stages import get_stage

    config_path = run_dir / CONFIG_FILE
    settings = public_settings(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {})
    stage = get_stage(stage_of(run_dir) or "pretrain", str(run_dir))
    base = hub_id_of(upload.base) or hub_id_of(settings.get("model_name_or_path"))
    tags = ["hfpipe", stage.name, *stage.card_tags, *(["lora"] if upload.base else [])]
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        base_model=base,
        datasets=hub_datasets(settings) or None,
        library_name="peft" if upload.kind == "adapter" else "transformers",
        pipeline_tag=stage.pipeline_tag,
        tags=tags,
    )
    name = settings.get("model_name_or_path")
    origin = f"`{base}`" if base else f"`{name}` (a local model)" if name else "a GPT-2 built from scratch"
    body = "\n".join(
        [
            f"# {repo_id.split('/')[-1]}",
            "",
            f"{stage.card_title} of {origin} with hfpipe {__version__}. This repo holds "
            f"{UPLOADED[upload.kind]}.",
            "",
            "## Use it",
            "",
            "```python",
            usage(repo_id, upload.kind, upload.base, "CausalLM" if stage.generates else "SequenceClassification"),
            "```",
            "",
            f"or chat with it: `hfpipe chat {repo_id}`." if stage.generates else "It scores a text with one number.",
            "",
            "## Training",
            "",
            markdown_sections(report_sections(run_dir), level=3),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
