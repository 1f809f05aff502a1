"""Which files of a finished run go to the Hub, and where in the repo.

Files are chosen by name (an allowlist): weights only as safetensors (never a pickle such as training_args.bin),
no checkpoints, no optimizer states, no logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hfpipe.errors import ConfigError
from hfpipe.inference import adapter_base, save_merged_model
from hfpipe.modeling import looks_local

MERGED_DIR = "merged"  # in the run dir, as merge_adapter: true writes it
ADAPTER_SUBFOLDER = "adapter"  # in the repo when both are uploaded
MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
    }
)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
# Run records uploaded beside the model: local name -> name in the repo.
RUN_FILES = {
    "config.yaml": "hfpipe_config.yaml",
    "metrics.json": "metrics.json",
    "loss.png": "loss.png",
    "rewards.png": "rewards.png",
}


@dataclass
class Upload:
    """The files of one push: name in the repo -> local path."""

    kind: str  # model (a full fine-tune or pretrain), adapter, merged, or both
    files: dict[str, Path]
    base: str | None  # the base model of an adapter run
    why: str  # why this kind, for the log


def model_files(directory: Path) -> list[Path]:
    """The weights, configs and tokenizer files of a saved model or adapter dir."""
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and (path.name in MODEL_FILES or path.name.endswith(WEIGHT_SUFFIXES))
    )


def choose_upload(run_dir: Path, upload: str) -> tuple[str, str | None, str]:
    """Resolve hub_upload for this run: (kind, adapter base, why)."""
    base = adapter_base(run_dir)
    if base is None:
        if upload in ("adapter", "both"):
            raise ConfigError(f"{run_dir}: hub_upload: {upload} needs a LoRA run; this run saved a full model.")
        return "model", None, "a full model"
    if upload != "auto":
        return upload, base, "hub_upload"
    if looks_local(base):
        return "merged", base, f"the adapter's base '{base}' is a local dir that others cannot load"
    return "adapter", base, f"its base {base} is on the Hub"


def collect_upload(run_dir: Path, upload: str) -> Upload:
    """Choose the files to push from a finished run; merge the adapter into run_dir/merged first when a merged model
    is wanted and the run did not save one."""
    kind, base, why = choose_upload(run_dir, upload)
    files: dict[str, Path] = {}
    if kind in ("merged", "both"):
        merged = run_dir / MERGED_DIR
        if not (merged / "config.json").is_file():
            print(f"Merging the adapter into its base for the upload: {merged}")
            save_merged_model(run_dir, merged)
        files.update({path.name: path for path in model_files(merged)})
    if kind in ("model", "adapter"):
        files.update({path.name: path for path in model_files(run_dir)})
    if kind == "both":
        files.update({f"{ADAPTER_SUBFOLDER}/{path.name}": path for path in model_files(run_dir)})
    files.update({name: run_dir / local for local, name in RUN_FILES.items() if (run_dir / local).is_file()})
    return Upload(kind, files, base, why)
