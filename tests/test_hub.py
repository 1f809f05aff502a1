"""Publishing to the Hub, tested at the HTTP boundary: HF_ENDPOINT points at a local fake Hub that records every
request and keeps the committed files. No network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import load_recipe, write_config
from hub_server import FakeHub, FakeHubServer
from test_dpo import write_dpo_config
from test_sft import write_sft_config

from hfpipe import cli

TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"
ROUND_TRIP_FILES = {"README.md", "hfpipe_config.yaml", "metrics.json", "loss.png"}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fake Hub that accepts TOKEN, with the environment of a logged-in, online user pointed at it."""
    from huggingface_hub import constants

    with FakeHubServer(FakeHub(token=TOKEN)) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        # The fake speaks the LFS protocol, not Xet's (which the real Hub offers besides).
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield fake


def sft_lora_config(directory: Path, base: Path, extra: str = "") -> Path:
    """A 2-step LoRA SFT config on the tiny GPT-2 (a local base)."""
    lora = "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [c_attn]\n"
    return write_sft_config(directory, base, extra=lora + extra)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    """A finished LoRA SFT run that was not pushed."""
    config = sft_lora_config(tmp_path_factory.mktemp("lora-run"), tiny_gpt2_dir)
    load_recipe("sft").main(["--config", str(config)])
    return config.parent / "run"


def card_metadata(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def assert_token_nowhere(hub: FakeHub, run: Path, output: str) -> None:
    assert TOKEN not in output
    assert all(TOKEN not in body for body in hub.request_bodies())
    for path in run.rglob("*"):  # every file, pickles (training_args.bin) and checkpoints included
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_recipe_pushes_once_at_the_end_with_a_card(
    hub: FakeHub, tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch, capfd
) -> None:
    monkeypatch.delenv("HF_TOKEN")  # the token from the config this time: it must not leak from there either
    config = sft_lora_config(
        tmp_path, tiny_gpt2_dir, f"push_to_hub: true\nhub_model_id: tester/tiny-sft\nhub_token: {TOKEN}\n"
    )
    metrics = load_recipe("sft").main(["--config", str(config)])
    run = tmp_path / "run"
    out, err = capfd.readouterr()
    output = out + err

    # Checked before training (whoami), then one repo, one commit: the Trainer's own pushes are off.
    assert hub.requests[0][0:2] == ("GET", "/api/whoami-v2") and hub.requests[0][2] == f"Bearer {TOKEN}"
    assert hub.repos == {"tester/tiny-sft": {"private": True}}
    assert len(hub.commits) == 1
    # The base is a local dir, so 'auto' uploads the merged model (an adapter would be unusable elsewhere).
    files = hub.files["tester/tiny-sft"]
    assert set(files) == ROUND_TRIP_FILES | {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert files["model.safetensors"] == (run / "merged" / "model.safetensors").read_bytes()
    assert files["metrics.json"] == (run / "metrics.json").read_bytes()
    metadata = card_metadata(files["README.md"])
    assert {"hfpipe", "sft", "trl", "lora"} <= set(metadata["tags"])
    assert metadata["library_name"] == "transformers" and "base_model" not in metadata  # a local base has no Hub id
    card = files["README.md"].decode()
    for part in ('from_pretrained("tester/tiny-sft")', "### Results", "### Configuration", "![loss.png](loss.png)"):
        assert part in card
    assert "train.jsonl" in card and f"eval_loss | {metrics['eval_loss']:.6g}" in card
    assert hub.cards_checked == 1  # the card's metadata went through the Hub's check before the upload
    assert (run / "training_args.bin").is_file()  # scanned below: the Trainer pickles its arguments
    record = json.loads((run / "hub_push.json").read_text())
    assert record["repo_id"] == "tester/tiny-sft" and record["uploaded"] == "merged" and record["private"] is True
    assert f"Pushed {len(files)} files" in out
    assert_token_nowhere(hub, run, output)


def test_push_command_uploads_adapter_merged_or_both(hub: FakeHub, lora_run: Path, capfd) -> None:
    cli.main(["push", str(lora_run), "--repo", "tester/adapter-only", "--upload", "adapter", "--public"])
    adapter_files = hub.files["tester/adapter-only"]
    assert set(adapter_files) == ROUND_TRIP_FILES | {
        "adapter_config.json",
        "adapter_model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert hub.repos["tester/adapter-only"]["private"] is False
    metadata = card_metadata(adapter_files["README.md"])
    assert metadata["library_name"] == "peft"
    assert "AutoPeftModelForCausalLM" in adapter_files["README.md"].decode()

    cli.main(["push", str(lora_run), "--repo", "both-kinds", "--upload", "both"])  # under the token's account
    both = hub.files["tester/both-kinds"]
    expected = {"config.json", "model.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert expected <= set(both)
    assert both["adapter/adapter_model.safetensors"] == (lora_run / "adapter_model.safetensors").read_bytes()
    assert both["model.safetensors"] == (lora_run / "merged" / "model.safetensors").read_bytes()
    assert 'subfolder="adapter"' in both["README.md"].decode()
    assert hub.repos["tester/both-kinds"]["private"] is True
    # Pushing the adapter alone to the same repo replaces the model: the merged files of the first push go.
    cli.main(["push", str(lora_run), "--repo", "both-kinds", "--upload", "adapter"])
    assert set(hub.files["tester/both-kinds"]) == set(adapter_files)
    assert {"config.json", "model.safetensors", "adapter/adapter_config.json"} <= set(hub.commits[-1]["deleted"])

    # An existing public repo stays public, and the record says so; a branch is created when asked for.
    out = capfd.readouterr().out
    cli.main(["push", str(lora_run), "--repo", "tester/adapter-only", "--upload", "adapter", "--revision", "dev"])
    assert "already existed as a public repo" in capfd.readouterr().out
    assert json.loads((lora_run / "hub_push.json").read_text())["private"] is False
    assert ("tester/adapter-only", "dev") in hub.branches and hub.commits[-1]["revision"] == "dev"
    assert_token_nowhere(hub, lora_run, out + "".join(capfd.readouterr()))


def test_pretrained_model_pushes_under_the_run_name(hub: FakeHub, tiny_config, pretrain_main) -> None:
    config = tiny_config()
    config.write_text(config.read_text() + "push_to_hub: true\nhub_private_repo: false\n")
    pretrain_main(["--config", str(config)])
    files = hub.files["tester/run"]  # no hub_model_id: the run name, under the token's account
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files)
    assert not any(name.endswith((".bin", ".pt")) or "checkpoint" in name for name in files)  # no pickles
    assert hub.repos["tester/run"]["private"] is False
    assert "a GPT-2 built from scratch" in files["README.md"].decode()


def test_dpo_run_pushes_with_its_reward_plot(hub: FakeHub, tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    config = write_dpo_config(tmp_path, tiny_gpt2_dir, extra="push_to_hub: true\nhub_model_id: team/tiny-dpo\n")
    load_recipe("dpo").main(["--config", str(config)])
    files = hub.files["team/tiny-dpo"]  # an organisation the token's account belongs to
    assert {"model.safetensors", "rewards.png", "loss.png", "hfpipe_config.yaml"} <= set(files)
    assert {"hfpipe", "dpo", "trl"} <= set(card_metadata(files["README.md"])["tags"])
    assert "Preference alignment (DPO)" in files["README.md"].decode()


def test_refused_push_keeps_the_run_and_says_how_to_retry(
    hub: FakeHub, tmp_path: Path, tiny_gpt2_dir: Path, capsys
) -> None:
    hub.refuse["commit"] = 403
    config = sft_lora_config(tmp_path, tiny_gpt2_dir, "push_to_hub: true\nhub_model_id: team/model\n")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("sft").main(["--config", str(config)])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the training's progress bars
    assert exit_info.value.code == 2 and error.startswith("error: pushing")
    assert "403" in error and f"hfpipe push {tmp_path / 'run'} --repo team/model" in error
    run = tmp_path / "run"
    assert (run / "metrics.json").is_file() and (run / "adapter_model.safetensors").is_file()
    assert not (run / "hub_push.json").exists() and not hub.commits
    with pytest.raises(SystemExit):  # running it again points to hfpipe push rather than to retraining
        load_recipe("sft").main(["--config", str(config)])
    assert f"to push it as it is: hfpipe push {run}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("offline", "HF_HUB_OFFLINE is set"),
        ("no-token", "run `hf auth login` or set HF_TOKEN"),
        ("bad-token", "the Hub answered 401"),
        ("unreachable", "could not be reached"),
        ("bad-repo-id", "hub_model_id: "),
        ("read-only-token", "the token is read-only"),
        ("other-namespace", "cannot create repos under 'someone-else' (its namespaces: team, tester)"),
    ],
)
def test_push_that_cannot_work_stops_before_training(
    hub: FakeHub, tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch, capsys, setup: str, expected: str
) -> None:
    from huggingface_hub import constants

    repo = {"bad-repo-id": "bad//id", "other-namespace": "someone-else/x"}.get(setup, "tester/x")
    hub.token_role = "read" if setup == "read-only-token" else "write"
    if setup == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif setup == "no-token":
        monkeypatch.delenv("HF_TOKEN")
    elif setup == "bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    elif setup == "unreachable":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    config = sft_lora_config(tmp_path, tiny_gpt2_dir, f"push_to_hub: true\nhub_model_id: {repo}\n")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("sft").main(["--config", str(config)])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and expected in error[0], error
    assert str(config) in error[0]
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written
    assert not hub.repos


def test_hub_settings_that_make_no_sense_are_refused(tmp_path: Path, corpus: Path, capsys) -> None:
    config = write_config(tmp_path / "pretrain.yaml", f'train_files: ["{corpus}/train/*.txt"]\nhub_upload: adapter\n')
    with pytest.raises(SystemExit):
        cli.main(["check", str(config)])
    assert "hub_upload: adapter needs a LoRA run" in capsys.readouterr().err
    config.write_text(config.read_text().replace("hub_upload: adapter", "hub_strategy: checkpoint"))
    with pytest.raises(SystemExit):
        cli.main(["check", str(config)])
    assert "hfpipe pushes once" in capsys.readouterr().err


def test_push_command_refuses_an_unfinished_run(hub: FakeHub, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", str(tmp_path), "--repo", "tester/x"])
    assert exit_info.value.code == 2 and "not a finished run" in capsys.readouterr().err
    assert not hub.requests
