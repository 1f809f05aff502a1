"""No network call the user did not ask for: a training stage, `hfpipe generate` and `hfpipe eval`, run with the
Hub's offline switches unset and CI unset (TRL pings the Hub at trainer construction unless told not to), connect to
no address outside this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_sft import write_sft_config

ROOT = Path(__file__).resolve().parents[1]

# The start of a script run in a child process (run_guarded): every connection or name lookup of a non-loopback address
# is recorded and refused; the script ends with print_attempts(), which prints the recorded attempts as JSON.
NETWORK_GUARD = r"""
import json, socket, sys, runpy

attempts = []
LOCAL = ("127.", "::1", "localhost", "0.0.0.0")

def local(host):
    return isinstance(host, str) and (host.startswith(LOCAL) or host == "")

real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
        attempts.append(f"connect {address[0]}:{address[1]}")
        raise OSError("network guard: no connection outside this machine")
    return real_connect(self, address)

def getaddrinfo(host, *args, **kwargs):
    if not local(host if isinstance(host, str) else str(host)):
        attempts.append(f"lookup {host}")
        raise socket.gaierror("network guard: no lookup outside this machine")
    return real_getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo

def print_attempts():
    from huggingface_hub.utils import _telemetry
    thread = getattr(_telemetry, "_TELEMETRY_THREAD", None)
    if thread is not None:
        thread.join(timeout=30)
    print("ATTEMPTS " + json.dumps({"attempts": attempts, "telemetry_thread": thread is not None}))
"""
# The recipe, generate and eval, guarded.
GUARDED_RUN = (
    NETWORK_GUARD
    + r"""
config, run_dir, text_file = sys.argv[1:4]
sys.argv = ["recipes/sft.py", "--config", config]
runpy.run_path("recipes/sft.py", run_name="__main__")
from hfpipe import cli
cli.main(["generate", run_dir, "--prompt", "Name a king.", "--max-new-tokens", "2"])
cli.main(["eval", run_dir, "--text", text_file])
print_attempts()
"""
)


def run_guarded(script: str, args: list[str], tmp_path: Path) -> dict:
    """Run `script` (NETWORK_GUARD + code ending with print_attempts()) in a child process, with the Hub's offline
    switches, CI and HFPIPE_TELEMETRY unset and the caches in `tmp_path`; return its report of connection attempts."""
    unset = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "CI"}
    env = {key: value for key, value in os.environ.items() if key not in unset and key != "HFPIPE_TELEMETRY"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HFPIPE_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("ATTEMPTS "))
    return json.loads(line.removeprefix("ATTEMPTS "))


def test_train_generate_and_eval_make_no_network_call(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    config = write_sft_config(tmp_path, tiny_gpt2_dir)
    text = tmp_path / "eval.txt"
    text.write_text("the king and the queen speak of the crown " * 20)
    report = run_guarded(GUARDED_RUN, [str(config), str(tmp_path / "run"), str(text)], tmp_path)
    assert report == {"attempts": [], "telemetry_thread": False}
