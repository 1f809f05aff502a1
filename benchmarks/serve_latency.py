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


def start_server(model: Path, port: int, max_tokens: int) -> subprocess.Popen:
    """`hfpipe serve` as a subprocess; returns once /v1/models answers."""
    import openai

    command = [sys.executable, "-m", "hfpipe.cli", "serve", str(model), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--model-id", "bench", "--max-new-tokens", str(max_tokens)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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


def main() -> None:
    """Run the benchmark; write the JSON result and the README table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model dir (default: outputs/quickstart/sft, or a random one)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
