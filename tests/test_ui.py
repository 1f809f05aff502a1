"""`hfpipe ui`: the runs it lists (the shipped quickstart configs' 2-step runs), statuses, live curves, config
differences, chat answers equal to `hfpipe chat`'s, refusals, a page that only reads; then the page itself in
headless Chromium (Debian's chromium and chromium-driver packages, driven by Selenium)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from test_config import shakespeare_prepared  # noqa: F401 (an autouse fixture: it applies here too)
from test_serve import running_server

from hfpipe.rundir import CONFIG_FILE, METRICS_FILE, TRAIN_LOG, hold_run_lock, release_run_lock
from hfpipe.tools.ui import create_app
from hfpipe.tools.ui_chat import ModelPool
from hfpipe.tools.ui_runs import config_diff

QUICKSTART = {  # the shipped quickstart pipeline's training configs and the stage each trains
    "configs/quickstart/pretrain.yaml": "pretrain",
    "configs/sft/quickstart.yaml": "sft",
    "configs/dpo/quickstart.yaml": "dpo",
}
QUESTION = "Who wrote Hamlet?"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def runs_dir(shipped_runs: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of runs: the quickstart configs' 2-step runs, a copy of the SFT run with another learning rate, an
    interrupted run (no metrics.json) and one still training (its lock held below)."""
    root = tmp_path_factory.mktemp("ui-runs")
    for config, stage in QUICKSTART.items():
        run = shipped_runs.get(ROOT / config)
        assert run.returncode == 0, run.failure()
        shutil.copytree(run.output_dir, root / "quickstart" / stage)
    sft = root / "quickstart" / "sft"
    changed = root / "sft-lr"
    shutil.copytree(sft, changed)
    settings = yaml.safe_load((changed / CONFIG_FILE).read_text())
    settings["learning_rate"] = 0.123
    first_line = (sft / CONFIG_FILE).read_text().splitlines()[0]
    (changed / CONFIG_FILE).write_text(first_line + "\n" + yaml.safe_dump(settings, sort_keys=False))
    for name in ("interrupted", "running"):
        shutil.copytree(sft, root / name)
        (root / name / METRICS_FILE).unlink()
    return root


@contextmanager
def running_ui(root: Path) -> Iterator[str]:
    """`hfpipe ui`'s app on a free port in a thread; yield its URL."""
    with running_server(create_app(root, ModelPool(device="cpu"))) as url:
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def ui_url(runs_dir: Path) -> Iterator[str]:
    """The UI over `runs_dir`, with the 'running' run's lock held as a training process holds it."""
    hold_run_lock(runs_dir / "running", "test")
    try:
        with running_ui(runs_dir) as url:
            yield url
    finally:
        release_run_lock(runs_dir / "running")


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def chat_reference(run_dir: Path, question: str, max_new_tokens: int) -> str:
    """The greedy answer `hfpipe chat` gives to `question` as the first message, computed here as chat does."""
    from hfpipe.models.trained import load_for_inference
    from hfpipe.tools.chat import ChatSession, Settings
    from hfpipe.tools.decoding import generate_ids

    loaded = load_for_inference(str(run_dir), device="cpu")
    session = ChatSession(loaded, Settings(temperature=0.0, top_k=None, top_p=None, max_new_tokens=max_new_tokens))
    ids = generate_ids(
        loaded.model, session.prompt_ids([{"role": "user", "content": question}]), session.generation_config()
    )
    return loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*") if path.is_file()}


def test_runs_list_shows_the_quickstart_runs_with_their_status_and_metrics(ui_url: str) -> None:
    runs = {run["name"]: run for run in get(f"{ui_url}/api/runs")["runs"]}
    for stage in QUICKSTART.values():
        run = runs[f"quickstart/{stage}"]
        assert (run["stage"], run["status"], run["metrics"]["global_step"]) == (stage, "finished", 2)
    assert runs["quickstart/sft"]["model"] != runs["quickstart/dpo"]["model"]
    assert runs["interrupted"]["status"] == "interrupted" and runs["running"]["status"] == "running"
    assert not any("checkpoint-" in name for name in runs)


def test_a_runs_page_has_its_curves_samples_and_config(ui_url: str, runs_dir: Path) -> None:
    run = get(f"{ui_url}/api/run?name=quickstart/sft")
    logged = [json.loads(line) for line in (runs_dir / "quickstart/sft" / TRAIN_LOG).read_text().splitlines()]
    assert run["curves"]["loss"]["loss"] == [[entry["step"], entry["loss"]] for entry in logged if "loss" in entry]
    assert [step for step, _ in run["curves"]["loss"]["eval_loss"]] == [0, 2]  # before training, then at the end
    assert run["samples"] and {"prompt", "before", "after"} <= set(run["samples"][0])
    assert run["config"] == (runs_dir / "quickstart/sft" / CONFIG_FILE).read_text()
    assert "process" in get(f"{ui_url}/api/run?name=running")["holder"]


def test_a_running_trainings_curves_grow_as_it_logs(ui_url: str, runs_dir: Path) -> None:
    log = runs_dir / "running" / TRAIN_LOG
    before = len(get(f"{ui_url}/api/run?name=running")["curves"]["loss"]["loss"])
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"loss": 1.5, "step": 3}) + "\n" + '{"loss": 1.4, "st')  # a line half written
    points = get(f"{ui_url}/api/run?name=running")["curves"]["loss"]["loss"]
    assert len(points) == before + 1 and points[-1] == [3, 1.5]


def test_comparison_names_the_keys_that_differ(ui_url: str) -> None:
    body = get(f"{ui_url}/api/compare?name=quickstart/sft&name=sft-lr")
    assert [row["key"] for row in body["config_diff"]] == ["learning_rate"]
    assert body["config_diff"][0]["values"][1] == "0.123"
    assert [run["name"] for run in body["runs"]] == ["quickstart/sft", "sft-lr"]


def test_config_diff_marks_keys_set_in_one_run_only() -> None:
    rows = config_diff([{"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 3], "c": "x"}])
    assert rows == [{"key": "b", "values": ["[1, 2]", "[1, 3]"]}, {"key": "c", "values": ["(not set)", "x"]}]


def test_chat_answers_as_hfpipe_chat_and_two_runs_answer_side_by_side(ui_url: str, runs_dir: Path) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    for stage in ("sft", "dpo"):
        status, body = post(
            f"{ui_url}/api/chat", {"run": f"quickstart/{stage}", "messages": messages, "max_new_tokens": 12}
        )
        assert status == 200, body
        assert body["answer"] == chat_reference(runs_dir / "quickstart" / stage, QUESTION, 12)
        assert body["decoding"] == "greedy, at most 12 new tokens"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"run": "../outside", "messages": [{"role": "user", "content": "hi"}]}, "not a run under"),
        ({"run": "interrupted", "messages": [{"role": "user", "content": "hi"}]}, "the run is interrupted"),
        ({"run": "quickstart/sft", "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p 2.0: must be"),
        ({"run": "quickstart/sft", "messages": [{"role": "assistant", "content": "hi"}]}, "end with a user message"),
    ],
)
def test_chat_refuses_bad_requests_in_one_line(ui_url: str, body: dict[str, Any], message: str) -> None:
    status, answer = post(f"{ui_url}/api/chat", body)
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"]


def test_the_page_changes_no_file(ui_url: str, runs_dir: Path) -> None:
    before = snapshot(runs_dir)
    get(f"{ui_url}/api/runs")
    get(f"{ui_url}/api/compare?name=quickstart/pretrain&name=quickstart/dpo")
    post(f"{ui_url}/api/chat", {"run": "quickstart/pretrain", "messages": [{"role": "user", "content": "To be"}]})
    assert snapshot(runs_dir) == before
    routes = {(route.path, method) for route in create_app(runs_dir).routes for method in getattr(route, "methods", ())}
    assert {path for path, method in routes if method not in ("GET", "HEAD")} == {"/api/chat"}


def test_hfpipe_ui_refuses_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hfpipe.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["ui", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2 and "no such folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Selenium; skipped where Debian's chromium and chromium-driver are missing."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver to run the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(condition: Any, seconds: float = 60) -> Any:
    """Poll `condition` until it returns something truthy; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the element is not there yet, or was replaced while read
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting after {seconds} s")


def test_the_page_in_a_browser(browser: Any, ui_url: str, runs_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def rows() -> dict[str, str]:
        found = browser.find_elements(By.CSS_SELECTOR, "#runs-table tr.run-row")
        return {row.get_attribute("data-run"): row.text for row in found}

    browser.get(ui_url)
    listed = wait_for(lambda: rows() if len(rows()) >= 3 else None)
    for stage in QUICKSTART.values():
        assert f"quickstart/{stage} {stage} finished" in listed[f"quickstart/{stage}"]
    assert " running " in listed["running"]

    # A running training's curve grows on the page as it logs, without a reload.
    browser.find_element(By.CSS_SELECTOR, 'tr[data-run="running"]').click()
    legend = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, '#run-details svg[data-title="loss"]').text)
    points = int(legend.split("loss (")[1].split(" points")[0])
    with open(runs_dir / "running" / TRAIN_LOG, "a", encoding="utf-8") as handle:
        handle.write("\n" + json.dumps({"loss": 1.3, "step": 4}) + "\n")
    wait_for(lambda: f"loss ({points + 1} points)" in browser.find_element(By.ID, "run-details").text, 15)

    # Compare: the changed key is named, with both values.
    for name in ("quickstart/sft", "sft-lr"):
        browser.find_element(By.CSS_SELECTOR, f'tr[data-run="{name}"] input').click()
    browser.find_element(By.ID, "compare-button").click()
    row = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, '#config-diff tr[data-key="learning_rate"]').text)
    assert "0.123" in row and "1 keys differ" in browser.find_element(By.ID, "compare-view").text

    # Chat: the greedy answer, as `hfpipe chat` gives it.
    browser.find_element(By.CSS_SELECTOR, 'header button[data-tab="chat"]').click()
    Select(browser.find_element(By.ID, "chat-run-a")).select_by_value("quickstart/dpo")
    tokens = browser.find_element(By.ID, "knob-max_new_tokens")
    tokens.clear()
    tokens.send_keys("12")
    browser.find_element(By.ID, "chat-input").send_keys(QUESTION)
    browser.find_element(By.ID, "chat-send").click()
    answer = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-log-a .answer"))[0].text
    assert answer and answer == chat_reference(runs_dir / "quickstart" / "dpo", QUESTION, 12)

    screenshot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


def test_train_log_is_the_trainers_log_history(runs_dir: Path) -> None:
    run_dir = runs_dir / "quickstart" / "sft"
    logged = [json.loads(line) for line in (run_dir / TRAIN_LOG).read_text().splitlines()]
    history = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    losses = [(entry["step"], entry["loss"]) for entry in logged if "loss" in entry]
    assert losses == [(entry["step"], entry["loss"]) for entry in history if "loss" in entry] and len(losses) == 2
    assert any("train_runtime" in entry for entry in logged)  # the end of training is logged too


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hfpipe.train.callbacks import TrainLogCallback

    lines = [json.dumps({"loss": 3.0 - step, "step": step}) for step in (1, 2, 3)]
    (tmp_path / TRAIN_LOG).write_text("\n".join(lines) + '\n{"loss": 0.5, "st')
    TrainLogCallback().on_train_begin(
        TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerState(global_step=2), TrainerControl()
    )
    assert (tmp_path / TRAIN_LOG).read_text().splitlines() == lines[:2]
