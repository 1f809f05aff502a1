"""Push a finished run to the Hugging Face Hub: the same upload as `push_to_hub: true` at the end of a recipe.

    hfpipe push outputs/sft-smollm2-135m-instruct-lora-r16 --repo my-name/smollm2-sft

The token comes from HF_TOKEN or `hf auth login`. The repo is private unless --public (or the run's config said
hub_private_repo: false).
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import yaml

from hfpipe.errors import ConfigError
from hfpipe.hub.files import choose_upload
from hfpipe.hub.publish import HubTarget, check_hub_access, check_repo_id, push_run
from hfpipe.rundir import CONFIG_FILE, is_finished
from hfpipe.sections import HubUpload

UPLOAD_CHOICES = typing.get_args(HubUpload)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe push`."""
    parser.add_argument("output_dir", type=Path, help="the output dir of a finished run")
    parser.add_argument(
        "--repo", help="name or namespace/name. Default: the run's hub_model_id, else its run name (your account)"
    )
    parser.add_argument(
        "--upload",
        choices=UPLOAD_CHOICES,
        help="from a LoRA run: the adapter, the merged model or both. Default: the run's hub_upload, else auto "
        "(the adapter when its base is on the Hub, else merged)",
    )
    parser.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    parser.add_argument("--revision", help="branch to push to, created when missing. Default: main")


def run(args: argparse.Namespace) -> None:
    """Check the run and the Hub access, then push."""
    run_dir: Path = args.output_dir
    if not is_finished(run_dir):
        raise ConfigError(f"{run_dir}: not a finished run (no metrics.json). Push a run that trained to the end.")
    config_path = run_dir / CONFIG_FILE
    settings = (yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None) or {}
    repo_id = args.repo or settings.get("hub_model_id") or settings.get("run_name") or run_dir.name
    check_repo_id(repo_id, "--repo" if args.repo else f"{config_path}: hub_model_id (the repo)")
    upload = args.upload or settings.get("hub_upload") or "auto"
    choose_upload(run_dir, upload)  # a wrong --upload for this run stops here, before any request
    check_hub_access(None, "hfpipe push", repo_id)
    target = HubTarget(
        repo_id=repo_id,
        private=not args.public and settings.get("hub_private_repo") is not False,
        upload=upload,
        revision=args.revision or settings.get("hub_revision"),
    )
    push_run(run_dir, target)
