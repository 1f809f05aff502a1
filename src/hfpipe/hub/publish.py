"""Publishing to the Hugging Face Hub: the checks made before training, and one commit of a finished run.

`push_to_hub: true` in a recipe config pushes once, after the run is finished (the Trainer's own pushes during
training are turned off). `hfpipe push OUTPUT_DIR` pushes a finished run later. The token comes from `hub_token`,
`HF_TOKEN` or `hf auth login`, and is never printed or written anywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfpipe.errors import ConfigError, UserError
from hfpipe.rundir import HUB_RECORD


class HubError(UserError):
    """The Hub could not be reached or refused a request."""


@dataclass(frozen=True)
class HubTarget:
    """Where and how a finished run is pushed."""

    repo_id: str  # "name" (under the token's account) or "namespace/name"
    private: bool
    upload: str  # auto, adapter, merged or both (see RunArguments.hub_upload)
    revision: str | None = None
    token: str | None = field(default=None, repr=False)


def hub_endpoint() -> str:
    """The Hub's address: HF_ENDPOINT when set (read at call time, unlike huggingface_hub's constant)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token)


def describe_hub_error(error: Exception) -> str:
    """One line on why a Hub request failed: the status and the server's message, or why it was not reached."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    response = getattr(error, "response", None)
    if isinstance(error, HfHubHTTPError) and response is not None:
        message = (error.server_message or response.reason_phrase or "").strip().splitlines()
        status = response.status_code
        advice = {
            401: ": the token was rejected; check HF_TOKEN or run `hf auth login`",
            403: ": the token has no write access to this repo or namespace",
        }.get(status, "")
        return f"the Hub answered {status}{f' ({message[0]})' if message else ''}{advice}"
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    detail = str(error).strip().splitlines()
    reason = f"{type(error).__name__}{f': {detail[0]}' if detail else ''}"
    if isinstance(error, (ValueError, RuntimeError)) and not isinstance(error, OSError):
        return reason  # a refusal found in an answer (e.g. LFS batch errors), or the upload client's own error
    return f"{hub_endpoint()} could not be reached ({reason})"


@contextlib.contextmanager
def hub_errors(what: str, error_class: type[UserError] = HubError, hint: str = "") -> Iterator[None]:
    """Turn any failure of a Hub request inside the block into one line: `what` failed, why, and `hint`."""
    import httpx2  # huggingface_hub's HTTP client: its errors cover refused connections and timeouts

    try:
        yield
    except (httpx2.HTTPError, OSError, ValueError, RuntimeError) as error:
        raise error_class(f"{what} failed: {describe_hub_error(error)}.{f' {hint}' if hint else ''}") from None


def check_hub_access(token: str | None, where: str, repo_id: str, hint: str = "") -> None:
    """Stop with one line when a push to `repo_id` cannot work: offline mode, no token, Hub unreachable, token
    rejected, read-only, or no write access to the repo's namespace (as far as the token's details tell)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where}: HF_HUB_OFFLINE is set, so nothing can be pushed to the Hub. {hint}".rstrip())
    token = token or get_token()
    if not token:
        raise ConfigError(
            f"{where}: pushing needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN."
        )
    with hub_errors(f"{where}: checking the token with {hub_endpoint()}", ConfigError, hint):
        account = _api(token).whoami()
    role = (account.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise ConfigError(f"{where}: the token is read-only; pushing needs a token with write access. {hint}".rstrip())
    namespace = repo_id.split("/")[0] if "/" in repo_id else account["name"]
    writable = {account["name"], *(org.get("name") for org in account.get("orgs") or [])}
    if role == "write" and namespace not in writable:
        raise ConfigError(
            f"{where}: the token's account '{account['name']}' cannot create repos under '{namespace}' (its "
            f"namespaces: {', '.join(sorted(writable))}). {hint}".rstrip()
        )


def check_repo_id(repo_id: str, where: str) -> None:
    """Stop with one line when `repo_id` is not of the form name or namespace/name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None


def check_hub_settings(values: dict[str, Any], where: str, trains_adapter: bool) -> None:
    """Config check (before anything loads): what to upload, the repo id's form, and that the Hub takes the token.
    Smoke runs do not push, so they are not checked."""
    strategy = getattr(values.get("hub_strategy"), "value", values.get("hub_strategy"))
    if strategy not in (None, "every_save"):
        raise ConfigError(
            f"{where}: hub_strategy: {strategy!r}: hfpipe pushes once, when the run is finished, and never pushes "
            "checkpoints. Remove the key."
        )
    if values.get("hub_upload") in ("adapter", "both") and not trains_adapter:
        raise ConfigError(
            f"{where}: hub_upload: {values['hub_upload']} needs a LoRA run (use_peft: true); this run trains the "
            "full model. Remove the key."
        )
    if not values.get("push_to_hub") or values.get("smoke"):
        return
    repo_id = values.get("hub_model_id") or values["run_name"]
    check_repo_id(repo_id, f"{where}: hub_model_id" if values.get("hub_model_id") else f"{where}: run_name (the repo)")
    later = "Or set push_to_hub: false and push the finished run later with `hfpipe push OUTPUT_DIR`."
    check_hub_access(values.get("hub_token"), f"{where}: push_to_hub", repo_id, later)


def take_push_request(training_args: Any, run_args: Any) -> HubTarget | None:
    """Return where to push the finished run (None: nowhere) and turn the Trainer's own pushes off: hfpipe pushes
    once, after metrics.json marks the run finished. Private unless hub_private_repo is false."""
    wanted, token = training_args.push_to_hub, training_args.hub_token
    # The Trainer pickles its arguments into training_args.bin and every checkpoint: the token must not be there.
    training_args.push_to_hub, training_args.hub_token = False, None
    if not wanted:
        return None
    if run_args.smoke:
        print("--smoke: the run is not pushed to the Hub.")
        return None
    return HubTarget(
        repo_id=training_args.hub_model_id or training_args.run_name,
        private=training_args.hub_private_repo is not False,
        upload=run_args.hub_upload,
        revision=training_args.hub_revision,
        token=token,
    )


def push_run(run_dir: Path, target: HubTarget) -> str:
    """Push a finished run in one commit: the chosen weights, tokenizer and configs, the plots, and a model card as
    README.md. Writes hub_push.json in the run dir and returns the repo's URL. A refusal or an unreachable Hub
    raises HubError (one line); the local run is left as it was."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    from hfpipe.hub.card import model_card
    from hfpipe.hub.files import collect_upload, stale_files

    upload = collect_upload(run_dir, target.upload)
    print(f"Pushing {run_dir} to the Hub: {upload.kind} ({upload.why}).")
    hint = (
        f"The run is finished and intact in {run_dir}; push it later with: hfpipe push {run_dir} --repo "
        f"{target.repo_id}"
    )
    api = _api(target.token)
    with hub_errors(f"pushing {run_dir} to {hub_endpoint()}/{target.repo_id}", hint=hint):
        repo = api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if target.revision:
            api.create_branch(repo.repo_id, branch=target.revision, exist_ok=True)
        info = api.repo_info(repo.repo_id, revision=target.revision)
        card = model_card(run_dir, repo.repo_id, upload)
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in upload.files.items()
        ]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
        existing = [sibling.rfilename for sibling in info.siblings or []]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale_files(existing, upload)]
        commit = api.create_commit(
            repo.repo_id,
            operations,
            commit_message=f"Upload {run_dir.name} ({upload.kind}) with hfpipe",
            revision=target.revision,
        )
    private = target.private if info.private is None else info.private
    if private != target.private:
        print(f"note: {repo.repo_id} already existed as a {'private' if private else 'public'} repo; left so.")
    record = {
        "repo_id": repo.repo_id,
        "url": str(repo),
        "commit": commit.oid,
        "revision": target.revision or "main",
        "private": private,
        "uploaded": upload.kind,
        "files": sorted([*upload.files, "README.md"]),
        "pushed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (run_dir / HUB_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    size = sum(path.stat().st_size for path in upload.files.values())
    print(
        f"Pushed {len(record['files'])} files ({size / 1e6:.1f} MB) to {record['url']} "
        f"({'private' if private else 'public'}, commit {commit.oid[:10]})."
    )
    return record["url"]
