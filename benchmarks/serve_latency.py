"""Serving latency: first streamed token and total time of `hfpipe serve` (through the openai client, over HTTP)
against the same generation in-process (model.generate with a TextIteratorStreamer in a thread).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_latency.py                 # outputs/quickstart/sft
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_latency.py --model DIR

The model is outputs/quickstart/sft when that run has finished, else a randomly initialised GPT-2 of the quickstart
shape (4 layers, 4 heads, 128 dims, a 2048-entry BPE vocabulary trained on the shipped corpus). Prompts are the
instructions of data/instructions/test.jsonl, rendered as the server renders a one-message chat; decoding is
greedy with a fixed number of new tokens at most. Each round sends every prompt to both contenders alternately
(the server is idle while the in-process reference runs). "First content" is the time from sending the request to
the first chunk with text: TextIteratorStreamer releases text at word boundaries, so it is the first word for
both. Writes benchmarks/results/serve_latency.json and the table in benchmarks/README.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_latency.py --load                  # the load test

The load test runs three servers of the same model: the server issue 14 measured (hfpipe at ISSUE_SERVER_COMMIT,
`model.generate` for one request at a time, taken from this repository's git history), today's server at
`--max-batch-size 1` (one answer at a time through the batching loop) and at the default continuous batching
(`--max-batch-size 16`). It sends each the same streamed greedy chat requests from 1, 4 and 16 concurrent clients
(threads of this process, each sending its next request once its answer is complete), in alternating rounds.
Per setting: aggregate generated tokens/s (the servers' usage counts over the wall time of all requests) and the
p50 / p95 time to the first content chunk. Writes benchmarks/results/serve_load.json and prints a markdown table
(benchmarks/README.md is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from readme_table import write_marked_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICKSTART_SFT = ROOT / "outputs" / "quickstart" / "sft"
# the last commit before continuous batching: `model.generate` for one request at a time on one worker thread,
# the server issue 14's 4x target is measured against ("today's one-at-a-time server")
ISSUE_SERVER_COMMIT = "7b44e517ed9813e7494c013944ebcbe57cdb17eb"
MARKER = "serve-table"
SECTION = "## Serving: first streamed token"


def build_fallback_model(work: Path) -> Path:
    """A random GPT-2 of the quickstart shape with a 2048-entry BPE tokenizer trained on the shipped corpus."""
    from transformers import set_seed

    from hfpipe.data.tokenizers import train_bpe
    from hfpipe.models.gpt2 import build_gpt2

    texts = [path.read_text(encoding="utf-8") for path in sorted((ROOT / "data/shakespeare/train").glob("*.txt"))]
    tokenizer = train_bpe(texts, 2048)
    set_seed(0)
    model = build_gpt2({"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256}, 0.0, tokenizer)
    model_dir = work / "gpt2-quickstart-shape"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def load_prompts(count: int) -> list[str]:
    """The first `count` instructions of the shipped test set (an input appended after a blank line)."""
    rows = [json.loads(line) for line in (ROOT / "data/instructions/test.jsonl").read_text().splitlines()]
    return [row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "") for row in rows[:count]]


def free_port() -> int:
    """A TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, port: int, max_tokens: int, *flags: str, source: Path | None = None) -> subprocess.Popen:
    """`hfpipe serve` as a subprocess (with extra `flags`; the hfpipe package from `source`, a src dir, when
    given); returns once /v1/models answers."""
    import openai

    command = [sys.executable, "-m", "hfpipe.cli", "serve", str(model), "--port", str(port), *flags]
    env = os.environ if source is None else {**os.environ, "PYTHONPATH": str(source)}
    process = subprocess.Popen(
        [*command, "--model-id", "bench", "--max-new-tokens", str(max_tokens)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"hfpipe serve exited with code {process.returncode}")
        try:
            client.models.list()
            return process
        except openai.APIConnectionError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("hfpipe serve did not start")


def time_server(client, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: seconds to the first content chunk and to the end, and the text."""
    start = time.perf_counter()
    first, pieces = None, []
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(content)
    return {"first_s": first, "total_s": time.perf_counter() - start, "text": "".join(pieces)}


def time_in_process(loaded, prompt: str, max_tokens: int) -> dict:
    """The same generation in-process: model.generate in a thread with the GenerationConfig the server builds,
    text through a TextIteratorStreamer."""
    import torch
    from transformers import TextIteratorStreamer

    from hfpipe.tools.decoding import build_generation_config
    from hfpipe.tools.prompts import encode_prompt, render_chat_prompt

    tokenizer = loaded.tokenizer
    start = time.perf_counter()
    text = render_chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    ids = encode_prompt(tokenizer, text, "chat" if tokenizer.chat_template else "instruction")
    input_ids = torch.tensor([ids])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    config = build_generation_config(loaded.model, tokenizer, max_new_tokens=max_tokens, do_sample=False)
    options = {"attention_mask": torch.ones_like(input_ids), "generation_config": config, "streamer": streamer}
    thread = threading.Thread(target=loaded.model.generate, args=(input_ids,), kwargs=options)
    thread.start()
    first, pieces = None, []
    for piece in streamer:
        if piece:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(piece)
    thread.join()
    return {"first_s": first, "total_s": time.perf_counter() - start, "text": "".join(pieces)}


def median_ms(runs: list[dict], key: str) -> float:
    """Median of one timing over runs that produced text, in milliseconds."""
    return 1000 * statistics.median(run[key] for run in runs if run[key] is not None)


def write_table(result: dict) -> None:
    """Rewrite the table between the serve-table markers in benchmarks/README.md (adding the section once)."""
    reference, server = result["runs"]["in_process"], result["runs"]["server"]
    rows = [
        f"| {name} | {median_ms(runs, 'first_s'):.1f} | {median_ms(runs, 'total_s'):.1f} |"
        for name, runs in (("in-process generate + TextIteratorStreamer", reference), ("hfpipe serve + openai", server))
    ]
    table = "\n".join(
        [
            f"{result['model']}, OMP_NUM_THREADS={result['omp_num_threads']}, {result['rounds']} rounds of "
            f"{result['prompts']} prompts, greedy, at most {result['max_tokens']} new tokens, machine load average "
            f"{' / '.join(map(str, result['load_average_1min']))} (start / end); same text from both: "
            f"{result['same_text']}/{len(server)}. Server overhead (median of per-request differences): first content "
            f"**{result['median_first_overhead_ms']:+.1f} ms**, total **{result['median_total_overhead_ms']:+.1f} ms**",
            "",
            "| contender | first content chunk, median ms | whole answer, median ms |",
            "| --- | --- | --- |",
            *rows,
        ]
    )
    write_marked_table(MARKER, table, section_if_missing=section_intro())


def section_intro() -> str:
    """The README section's text above its table."""
    return f"""{SECTION}

`benchmarks/serve_latency.py` times `hfpipe serve` through the openai client (a streamed chat completion over
HTTP on localhost) against the same greedy generation in-process (`model.generate` in a thread with a
`TextIteratorStreamer`), prompt by prompt, alternately. The difference is the cost of HTTP, JSON, server-sent
events, the request queue and the async streamer.

```bash
OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_latency.py
```

Target: first content chunk within a few milliseconds of in-process generation.
"""


def load_run(url: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` streamed chat completions (prompts in turn) from `clients` threads, each sending its next
    request when its answer is complete: aggregate generated tokens/s over the wall time, and every request's time
    to the first content chunk."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    lock, queue, done = threading.Lock(), list(range(requests)), []

    def one(index: int) -> tuple[float | None, int]:
        start, first, tokens = time.perf_counter(), None, 0
        stream = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": prompts[index % len(prompts)]}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first, tokens

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index = queue.pop(0)
            result = one(index)
            with lock:
                done.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    firsts = sorted(first for first, _ in done if first is not None)
    tokens = sum(count for _, count in done)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "first_s": firsts}


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of sorted values."""
    return values[min(len(values) - 1, max(0, round(fraction * len(values) + 0.5) - 1))]


def load_table(result: dict) -> str:
    """The markdown table of a load test result."""
    lines = [
        f"{result['model']}, OMP_NUM_THREADS={result['omp_num_threads']}, {result['requests']} streamed greedy chat "
        f"requests of at most {result['max_tokens']} new tokens per setting, {result['rounds']} alternating rounds "
        f"(medians), machine load average {' / '.join(map(str, result['load_average_1min']))} (start / end); "
        f"batched greedy answers equal to the issue's server's: {result['same_text']['issue_server']}/"
        f"{result['prompts']}, to batch size 1's: {result['same_text']['one_at_a_time']}/{result['prompts']}",
        "",
        "| clients | issue's server tok/s | batch size 1 tok/s | batched tok/s | batched vs issue's server | "
        "batched vs batch size 1 | TTFT p50 / p95 ms: issue's server, batch size 1, batched |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["table"]:
        modes = [row["issue_server"], row["one_at_a_time"], row["batched"]]
        ttft = ", ".join(f"{mode['ttft_p50_ms']:.0f} / {mode['ttft_p95_ms']:.0f}" for mode in modes)
        lines.append(
            f"| {row['clients']} | "
            + " | ".join(f"{mode['tokens_per_s']:.0f}" for mode in modes)
            + f" | **{row['speedup_vs_issue_server']:.2f}x** | **{row['speedup']:.2f}x** | {ttft} |"
        )
    return "\n".join(lines)


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds of one setting."""
    return {
        "tokens_per_s": statistics.median(run["tokens_per_s"] for run in runs),
        "ttft_p50_ms": 1000 * statistics.median(percentile(run["first_s"], 0.5) for run in runs),
        "ttft_p95_ms": 1000 * statistics.median(percentile(run["first_s"], 0.95) for run in runs),
    }


def same_answers(urls: dict[str, str], prompts: list[str], max_tokens: int) -> dict[str, int]:
    """For each server but the batched one: how many prompts get the same greedy text from it, asked one at a time,
    as from the batched server, asked all at once."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    def ask(url: str, prompt: str) -> str:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        messages = [{"role": "user", "content": prompt}]
        answer = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        batched = list(pool.map(lambda prompt: ask(urls["batched"], prompt), prompts))
    return {
        mode: sum(ask(url, prompt) == answer for prompt, answer in zip(prompts, batched, strict=True))
        for mode, url in urls.items()
        if mode != "batched"
    }


def issue_server_source(work: Path) -> Path:
    """The src dir of hfpipe at ISSUE_SERVER_COMMIT (the one-at-a-time server issue 14 measured), from git."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ISSUE_SERVER_COMMIT, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    return work / "src"


def run_load_test(args: argparse.Namespace) -> None:
    """The load test: both servers, 1 / 4 / 16 clients, alternating rounds; JSON and a printed table."""
    import torch

    load_before = os.getloadavg()[0]
    prompts = load_prompts(args.load_prompts)
    with tempfile.TemporaryDirectory() as work:
        model = args.model
        if model is None:
            model = QUICKSTART_SFT if (QUICKSTART_SFT / "metrics.json").is_file() else build_fallback_model(Path(work))
        issue_source = issue_server_source(Path(work))
        modes = {
            "issue_server": ((), issue_source),
            "one_at_a_time": (("--max-batch-size", "1"), None),
            "batched": (("--max-batch-size", str(args.max_batch_size)), None),
        }
        ports = {mode: free_port() for mode in modes}
        servers = {
            mode: start_server(model, ports[mode], args.max_tokens, *flags, source=source)
            for mode, (flags, source) in modes.items()
        }
        urls = {mode: f"http://127.0.0.1:{port}/v1" for mode, port in ports.items()}
        try:
            for url in urls.values():  # warm-up: first-call costs are not throughput
                load_run(url, prompts, 4, 8, args.max_tokens)
            same = same_answers(urls, prompts[:16], args.max_tokens)
            runs: dict[str, dict[int, list[dict]]] = {mode: {c: [] for c in args.clients} for mode in modes}
            for _ in range(args.rounds):
                for clients in args.clients:
                    for mode, url in urls.items():
                        runs[mode][clients].append(load_run(url, prompts, clients, args.requests, args.max_tokens))
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=60)
    table = []
    for clients in args.clients:
        row = {"clients": clients, **{mode: summarize(runs[mode][clients]) for mode in modes}}
        row["speedup"] = row["batched"]["tokens_per_s"] / row["one_at_a_time"]["tokens_per_s"]
        row["speedup_vs_issue_server"] = row["batched"]["tokens_per_s"] / row["issue_server"]["tokens_per_s"]
        table.append(row)
    result = {
        "model": model_label(model, args.model),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", f"unset ({torch.get_num_threads()} torch threads)"),
        "max_batch_size": args.max_batch_size,
        "issue_server_commit": ISSUE_SERVER_COMMIT,
        "requests": args.requests,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "prompts": min(16, len(prompts)),
        "same_text": same,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "table": table,
        "runs": {mode: {str(c): r for c, r in by_clients.items()} for mode, by_clients in runs.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "serve_load.json" if args.model is None else f"serve_load-{args.model.name}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(load_table(result))


def model_label(model: Path, given: Path | None) -> str:
    """The served model as the results name it: a path in the repo, the name given, or the random fallback."""
    if model.is_relative_to(ROOT):
        return str(model.relative_to(ROOT))
    return str(given) if given is not None else "random GPT-2 4x4x128, 2048 vocab"


def main() -> None:
    """Run the benchmark (or with --load the load test); write the JSON result and the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model dir (default: outputs/quickstart/sft, or a random one)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, help="alternating rounds (default: 5, or 3 for the load test)")
    parser.add_argument("--max-tokens", type=int, default=48)
    load = parser.add_argument_group("load test")
    load.add_argument("--load", action="store_true", help="run the load test instead of the latency comparison")
    load.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per setting")
    load.add_argument("--requests", type=int, default=96, help="requests per setting and round")
    load.add_argument("--load-prompts", type=int, default=64, help="distinct prompts sent in turn")
    load.add_argument("--max-batch-size", type=int, default=16, help="the batched server's --max-batch-size")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.load:
        args.rounds = args.rounds or 3
        run_load_test(args)
        return
    args.rounds = args.rounds or 5
    import openai
    import torch

    from hfpipe.models.trained import load_for_inference

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        model = args.model
        if model is None:
            model = QUICKSTART_SFT if (QUICKSTART_SFT / "metrics.json").is_file() else build_fallback_model(Path(work))
        port = free_port()
        server = start_server(model, port, args.max_tokens)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            loaded = load_for_inference(str(model), device="cpu")
            prompts = load_prompts(args.prompts)
            time_server(client, prompts[0], args.max_tokens)  # warm-up: first-call costs are not latency
            time_in_process(loaded, prompts[0], args.max_tokens)
            runs: dict[str, list[dict]] = {"in_process": [], "server": []}
            for _ in range(args.rounds):
                for prompt in prompts:
                    runs["in_process"].append(time_in_process(loaded, prompt, args.max_tokens))
                    runs["server"].append(time_server(client, prompt, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=60)
    pairs = list(zip(runs["in_process"], runs["server"], strict=True))
    timed = [(ref, srv) for ref, srv in pairs if ref["first_s"] is not None and srv["first_s"] is not None]
    result = {
        "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else "random GPT-2 4x4x128, 2048 vocab",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", f"unset ({torch.get_num_threads()} torch threads)"),
        "prompts": len(prompts),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "same_text": sum(ref["text"] == srv["text"] for ref, srv in pairs),
        "median_first_overhead_ms": 1000 * statistics.median(srv["first_s"] - ref["first_s"] for ref, srv in timed),
        "median_total_overhead_ms": 1000 * statistics.median(srv["total_s"] - ref["total_s"] for ref, srv in pairs),
        "server_exit_code": server.returncode,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other jobs on the machine
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result)
    print(json.dumps({key: value for key, value in result.items() if key != "runs"}, indent=2))


if __name__ == "__main__":
    main()
