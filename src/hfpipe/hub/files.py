"""Which files of a finished run go to the Hub, and where in the repo.

Files are chosen by name (an allowlist): weights only as safetensors (never a pickle such as training_args.bin),
no checkpoints, no optimizer states, no logs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hfpipe.errors import ConfigError
from hfpipe.models.pretrained import looks_local
from hfpipe.models.trained import save_merged_model
from hfpipe.rundir import CONFIG_FILE, LOSS_PLOT, MERGED_DIR, METRICS_FILE, REWARD_PLOT, adapter_base

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
    CONFIG_FILE: "hfpipe_config.yaml",
    METRICS_FILE: METRICS_FILE,
    LOSS_PLOT: LOSS_PLOT,
    REWARD_PLOT: REWARD_PLOT,
}


@dataclass
class Upload:
    """The files of one push: name in the repo -> local path."""

    kind: str  # model (a full fine-tune or pretrain), adapter, merged, or both
    files: dict[str, Path]
    base: str | None  # the base model of an adapter run
    why: str  # why this kind, for the log


def is_model_file(name: str) -> bool:
    """True for the weights, configs and tokenizer files of a model or adapter."""
    return name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES)


def model_files(directory: Path) -> list[Path]:
    """The weights, configs and tokenizer files of a saved model or adapter dir."""
    return sorted(path for path in directory.iterdir() if path.is_file() and is_model_file(path.name))


def stale_files(existing: list[str], upload: Upload) -> list[str]:
    """Model files in the repo that this upload does not replace (left by a push of another kind, e.g. a merged
    model before an adapter): deleting them keeps one consistent model in the repo. Other files are kept."""
    return sorted(
        name
        for name in existing
        if name not in upload.files and (name.startswith(f"{ADAPTER_SUBFOLDER}/") or is_model_file(name))
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
        if not merged.is_dir():
            print(f"Merging the adapter into its base for the upload: {merged}")
            partial = run_dir / f"{MERGED_DIR}.partial"  # renamed when complete: a killed merge is never pushed
            shutil.rmtree(partial, ignore_errors=True)
            save_merged_model(run_dir, partial)
            partial.rename(merged)
        files.update({path.name: path for path in model_files(merged)})
    if kind in ("model", "adapter"):
        files.update({path.name: path for path in model_files(run_dir)})
    if kind == "both":
        files.update({f"{ADAPTER_SUBFOLDER}/{path.name}": path for path in model_files(run_dir)})
    files.update({name: run_dir / local for local, name in RUN_FILES.items() if (run_dir / local).is_file()})
    return Upload(kind, files, base, why)
