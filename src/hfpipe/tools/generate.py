"""Generate text from a model dir, an adapter dir (loaded onto its base), a .gguf file or a Hub id.

  hfpipe generate outputs/quickstart/pretrain --prompt "ROMEO:"
  hfpipe generate outputs/quickstart/sft --prompt "Who is King Lear?" --compare
  hfpipe generate outputs/quickstart/sft --base outputs/quickstart/pretrain --prompts-file data/instructions/test.jsonl
  hfpipe generate outputs/quickstart/pretrain --prompt "To be, or not to be" --next-token 10

Decoding is greedy unless --do-sample or a sampling flag (--temperature, --top-k, --top-p) is given; values not
given come from the model's generation_config.json, then from transformers' defaults (top-k 50 when sampling).
--max-new-tokens defaults to half the model's context, at most 128.

Prompt format (--format): 'chat' renders the prompt as one user turn with the tokenizer's chat template;
'instruction' uses the '### Instruction:' layout that hfpipe's SFT trains on when there is no template; 'raw'
passes the text as given. The default is chat when the tokenizer has a template, instruction for an hfpipe SFT or
DPO run dir without one, and raw otherwise; with --base the base model gets the fine-tuned model's format when it
can read it. A single prompt is streamed; several are printed one after another. Generated text goes to stdout,
one line on the model, format and decoding to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfpipe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

    from hfpipe.models.trained import LoadedModel

FORMATS = ("chat", "instruction", "raw")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_MAX_NEW_TOKENS = 128
# --compare: label -> generation settings. Sampling columns set every sampling knob, so that a model's own
# generation_config cannot change what the column means.
COMPARE_STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "sampling t=0.7": {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "num_beams": 1},
    "top-p 0.9": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.9, "num_beams": 1},
    "beam search 4": {"do_sample": False, "num_beams": 4},
}


def cli_flag(field: str) -> str:
    """The command-line flag of a generation field: 'top_p' -> '--top-p'."""
    return "--" + field.replace("_", "-")


def check_sampling_values(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    name: Callable[[str], str] = cli_flag,
) -> None:
    """Raise a one-line ConfigError naming the first out-of-range value; None means "not given" and passes.

    `name` turns a field name into what the user typed (a CLI flag by default; an HTTP server can pass
    `lambda field: field` to name JSON fields).
    """
    rules = [
        ("temperature", temperature, lambda v: v > 0, "must be greater than 0 (greedy decoding needs no temperature)"),
        ("top_k", top_k, lambda v: v >= 0, "must be 0 (no top-k filter) or more"),
        ("top_p", top_p, lambda v: 0 < v <= 1, "must be greater than 0 and at most 1"),
        ("repetition_penalty", repetition_penalty, lambda v: v > 0, "must be greater than 0 (1 means no penalty)"),
        ("max_new_tokens", max_new_tokens, lambda v: v > 0, "must be greater than 0"),
        ("num_beams", num_beams, lambda v: v >= 1, "must be 1 or more"),
    ]
    for field, value, valid, rule in rules:
        if value is not None and not valid(value):  # written as "not valid" so that NaN fails too
            raise ConfigError(f"{name(field)} {value}: {rule}.")


def build_generation_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    num_beams: int | None = None,
) -> GenerationConfig:
    """A copy of the model's own generation config with the given values on top, ready for `model.generate`.

    Sampling is on when `do_sample` is True, or when it is None and a temperature, top-k or top-p is given;
    otherwise decoding is greedy (beam search with `num_beams` > 1). Values left None keep the model's
    generation_config.json, then transformers' defaults. The pad token is the tokenizer's pad (or EOS), and EOS
    the tokenizer's when the model names none.
    """
    from transformers import GenerationConfig

    config = GenerationConfig() if model.generation_config is None else copy.deepcopy(model.generation_config)
    sampling = do_sample if do_sample is not None else any(v is not None for v in (temperature, top_k, top_p))
    given = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "num_beams": num_beams,
    }
    config.update(
        max_new_tokens=max_new_tokens, do_sample=sampling, **{k: v for k, v in given.items() if v is not None}
    )
    if tokenizer is not None:
        if config.eos_token_id is None:
            config.eos_token_id = tokenizer.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
    return config


def describe_decoding(config: GenerationConfig) -> str:
    """One line on how a generation config decodes: 'greedy', 'beam search 4' or the sampling values."""
    if config.do_sample:
        knobs = [f"temperature {config.temperature if config.temperature is not None else 1.0}"]
        knobs.append(f"top-k {config.top_k if config.top_k is not None else 50}")
        knobs.append(f"top-p {config.top_p if config.top_p is not None else 1.0}")
        text = "sampling, " + ", ".join(knobs)
    else:
        text = f"beam search {config.num_beams}" if (config.num_beams or 1) > 1 else "greedy"
    if config.repetition_penalty not in (None, 1.0):
        text += f", repetition penalty {config.repetition_penalty}"
    return f"{text}, at most {config.max_new_tokens} new tokens"


def instruction_prompt(instruction: str) -> str:
    """The '### Instruction:' prompt hfpipe's SFT trains on (for a tokenizer without a chat template)."""
    from hfpipe.data.sft_rows import convert_row

    row = {"instruction": instruction, "input": "", "output": ""}
    return convert_row(row, "instruction", chat=False, system_prompt=None)["prompt"]


def instruction_conversation(messages: list[dict[str, str]]) -> str:
    """A conversation in hfpipe's instruction layout, for a tokenizer without a chat template: a system message as a
    first paragraph, each user message as an '### Instruction:' prompt, each assistant reply after its prompt and
    followed by a blank line. Ends with the prompt of the last user message."""
    parts = []
    for message in messages:
        if message["role"] == "user":
            parts.append(instruction_prompt(message["content"]))
        else:
            parts.append(message["content"] + "\n\n")
    return "".join(parts)


def render_chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text a model reads before its next reply to a conversation (role/content messages, the last one the
    user's): the chat template with its generation prompt, or without a template `instruction_conversation`."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return instruction_conversation(messages)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_format: str, system: str | None = None
) -> str:
    """The text the model reads for one prompt in a format of FORMATS (see the module docstring)."""
    if prompt_format == "raw":
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if prompt_format == "chat":
        return render_chat_prompt(tokenizer, messages)
    return instruction_conversation(messages)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, prompt_format: str) -> list[int]:
    """Token ids of a rendered prompt. Rendered chat templates carry their own special tokens (BOS), so nothing is
    added to them; raw and instruction prompts are tokenized as SFT tokenizes its prompts."""
    return tokenizer(text, add_special_tokens=prompt_format != "chat")["input_ids"]


def pick_format(requested: str | None, tokenizer: PreTrainedTokenizerBase, model_dir: str) -> tuple[str, str]:
    """The prompt format to use and why (see the module docstring); 'chat' without a template is an error."""
    if requested == "chat" and not tokenizer.chat_template:
        raise ConfigError(
            f"--format chat: {model_dir} has no chat template. Use --format instruction (hfpipe's SFT layout) or raw."
        )
    if requested is not None:
        return requested, "--format"
    if tokenizer.chat_template:
        return "chat", "the tokenizer's chat template"
    from hfpipe.rundir import stage_of
    from hfpipe.stages import STAGES

    stage = STAGES.get(stage_of(Path(model_dir).expanduser()) or "")
    if stage is not None and stage.instruction_layout:
        return "instruction", f"hfpipe {stage.name} run without a chat template"
    return "raw", "no chat template"


def context_length(model: PreTrainedModel) -> int | None:
    """Positions the model was built with (max_position_embeddings / n_positions), None when it has no limit."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_max_new_tokens(context: int | None) -> int:
    """New tokens when none are asked for: half the context, at most DEFAULT_MAX_NEW_TOKENS."""
    return DEFAULT_MAX_NEW_TOKENS if context is None else max(1, min(DEFAULT_MAX_NEW_TOKENS, context // 2))


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, context: int | None, what: str = "the prompt") -> None:
    """Raise a ConfigError with the counts when prompt + new tokens exceed the model's context."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ConfigError(
            f"{what} is {prompt_tokens} tokens and --max-new-tokens is {max_new_tokens}, but the model's context "
            f"holds {context} positions: shorten the prompt to at most {max(context - max_new_tokens, 0)} tokens or "
            "lower --max-new-tokens."
        )


def generate_ids(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    generation_config: GenerationConfig,
    streamer: Any = None,
    seed: int | None = None,
) -> list[int]:
    """The new token ids `model.generate` writes after one prompt; seeded first when `seed` is given."""
    import torch
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)
    input_ids = torch.tensor([list(prompt_ids)], device=model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=generation_config,
        streamer=streamer,
    )
    return output[0, input_ids.shape[1] :].tolist()


def next_token_probabilities(model: PreTrainedModel, prompt_ids: Sequence[int], k: int) -> list[tuple[int, float]]:
    """The `k` most likely next tokens after a prompt, as (token id, probability), most likely first: the softmax
    of the last position's logits."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt_ids)], device=model.device)).logits[0, -1]
    probabilities = torch.softmax(logits.float(), dim=-1)
    top = probabilities.topk(min(k, probabilities.shape[0]))
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def side_by_side(columns: Sequence[tuple[str, str]], width: int) -> str:
    """Texts in titled columns that fit `width` characters, wrapped; stacked under their titles when too narrow."""
    gap = " | "
    column = (width - len(gap) * (len(columns) - 1)) // len(columns)
    if column < 16:
        return "\n".join(f"--- {title}\n{text}" for title, text in columns)
    wrapped = [_wrap(text, column) for _, text in columns]
    lines = [gap.join(title[:column].ljust(column) for title, _ in columns).rstrip()]
    lines.append("-+-".join("-" * column for _ in columns))
    for row in zip_longest(*wrapped, fillvalue=""):
        lines.append(gap.join(cell.ljust(column) for cell in row).rstrip())
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for line in text.split("\n"):
        lines.extend(textwrap.wrap(line, width, drop_whitespace=True, expand_tabs=True) or [""])
    return lines


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per line, or JSONL (a .jsonl file, or every line a JSON object) with a 'prompt'
    or 'instruction' field (an 'input' field is appended after a blank line, as SFT does with a chat template)."""
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path}: no such file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"--prompts-file {path}: the file holds no prompt.")
    if path.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for line in lines):
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--prompts-file {path}: line {number} is not valid JSON ({error.msg}).") from None
        text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"--prompts-file {path}: line {number} has no 'prompt' (or 'instruction') string. "
                "Give one prompt per line, or JSON lines with a 'prompt' field."
            )
        extra = row.get("input") or ""
        prompts.append(text + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else ""))
    return prompts


@dataclass
class Prepared:
    """A loaded model with its prompts rendered and encoded in its format."""

    loaded: LoadedModel
    prompt_format: str
    why: str
    prompt_ids: list[list[int]]
    generation_config: GenerationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe generate`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", help="a run's output dir, an adapter dir, a .gguf file or a Hub id")
    source = parser.add_argument_group("prompts")
    source.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    source.add_argument("--prompts-file", type=Path, help="one prompt per line, or JSONL with a 'prompt' field")
    source.add_argument("--format", choices=FORMATS, help="how prompts are rendered (default: see above)")
    source.add_argument("--system", help="a system message (chat and instruction formats)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--max-new-tokens", type=int, help="default: half the context, at most 128")
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=float, help="> 0; turns sampling on")
    decoding.add_argument("--top-k", type=int, help=">= 0 (0: no top-k filter); turns sampling on")
    decoding.add_argument("--top-p", type=float, help="in (0, 1]; turns sampling on")
    decoding.add_argument("--repetition-penalty", type=float, help="> 0; 1 means none")
    decoding.add_argument("--num-beams", type=int, help="beam search with N beams (greedy decoding only)")
    decoding.add_argument("--seed", type=int, help="seed before each prompt, for reproducible sampling")
    modes = parser.add_argument_group("modes")
    modes.add_argument(
        "--compare", action="store_true", help=f"the prompts under {', '.join(COMPARE_STRATEGIES)}, side by side"
    )
    modes.add_argument("--base", metavar="OTHER_MODEL", help="also generate with OTHER_MODEL, side by side")
    modes.add_argument("--next-token", type=int, metavar="K", help="show the K most likely next tokens instead")
    loading = parser.add_argument_group("loading")
    loading.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    loading.add_argument("--device", help="e.g. cpu, cuda:0 (default: a GPU when present)")
    loading.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate every flag before any model is loaded; return the prompts."""
    check_sampling_values(
        args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.max_new_tokens, args.num_beams
    )
    if args.next_token is not None and args.next_token <= 0:
        raise ConfigError(f"--next-token {args.next_token}: must be greater than 0.")
    sampling = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.num_beams not in (None, 1) and sampling:
        raise ConfigError("--num-beams: beam search here is greedy; drop --num-beams or the sampling flags.")
    chosen = (("--compare", args.compare), ("--base", args.base), ("--next-token", args.next_token is not None))
    modes = [flag for flag, on in chosen if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined; pick one.")
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def prepare(
    name: str, prompts: list[str], args: argparse.Namespace, same_format_as: Prepared | None = None
) -> Prepared:
    """Load a model, render and encode the prompts in its format, check they fit, build its generation config.

    With `same_format_as` (the fine-tuned model, when this one is its --base) and no --format, the prompts are
    rendered as for that model when this one can read that format, so that both see the same text.
    """
    from hfpipe.models.trained import load_for_inference

    loaded = load_for_inference(name, args.dtype, args.device, args.trust_remote_code)
    prompt_format, why = pick_format(args.format, loaded.tokenizer, name)
    follow = same_format_as is not None and args.format is None
    if follow and (same_format_as.prompt_format != "chat" or loaded.tokenizer.chat_template):
        prompt_format, why = same_format_as.prompt_format, f"as for {same_format_as.loaded.path}"
    if args.system and prompt_format == "raw":
        raise ConfigError(f"--system: {name} takes raw prompts here; use --format chat or instruction with it.")
    texts = [render_prompt(loaded.tokenizer, prompt, prompt_format, args.system) for prompt in prompts]
    prompt_ids = [encode_prompt(loaded.tokenizer, text, prompt_format) for text in texts]
    context = context_length(loaded.model)
    max_new_tokens = args.max_new_tokens or default_max_new_tokens(context)
    if args.next_token is not None:
        max_new_tokens = 1  # only the prompt must fit
    for number, ids in enumerate(prompt_ids, start=1):
        what = "the prompt" if len(prompt_ids) == 1 else f"prompt {number}"
        check_prompt_fits(len(ids), max_new_tokens, context, f"{what} (as rendered for {name}, {prompt_format})")
    config = build_generation_config(
        loaded.model,
        loaded.tokenizer,
        max_new_tokens=max_new_tokens,
        do_sample=True if args.do_sample else None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
    )
    return Prepared(loaded, prompt_format, why, prompt_ids, config)


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Generated ids as text, special tokens (EOS, template markers) left out."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def print_header(prepared: Prepared, decoding: str | None = None) -> None:
    """One line on stderr: the model, the prompt format and the decoding (stdout keeps only generated text)."""
    loaded = prepared.loaded
    source = f"{loaded.path} (adapter on {loaded.base})" if loaded.base else loaded.path
    decoding = decoding or describe_decoding(prepared.generation_config)
    print(f"# {source} | format: {prepared.prompt_format} ({prepared.why}) | {decoding}", file=sys.stderr)


def stream_one(prepared: Prepared, seed: int | None) -> None:
    """Generate for one prompt, printing text as it comes (a raw prompt is printed before its continuation)."""
    from transformers import TextStreamer

    streamer = TextStreamer(
        prepared.loaded.tokenizer, skip_prompt=prepared.prompt_format != "raw", skip_special_tokens=True
    )
    generate_ids(prepared.loaded.model, prepared.prompt_ids[0], prepared.generation_config, streamer, seed)


def print_all(prepared: Prepared, prompts: list[str], seed: int | None) -> None:
    """Generate for each prompt; print the prompt after '>>> ' and the generated text under it."""
    for index, prompt in enumerate(prompts):
        print(f">>> {prompt}\n{complete(prepared, index, seed)}\n", flush=True)


def print_compare(prepared: Prepared, prompts: list[str], seed: int | None, width: int) -> None:
    """Each prompt under every strategy of COMPARE_STRATEGIES, in columns."""
    model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer
    configs = {label: copy.deepcopy(prepared.generation_config) for label in COMPARE_STRATEGIES}
    for label, settings in COMPARE_STRATEGIES.items():
        configs[label].update(**settings)
    for prompt, ids in zip(prompts, prepared.prompt_ids, strict=True):
        columns = [
            (label, decode(tokenizer, generate_ids(model, ids, config, seed=seed))) for label, config in configs.items()
        ]
        print(f">>> {prompt}\n{side_by_side(columns, width)}\n", flush=True)


def complete(prepared: Prepared, index: int, seed: int | None = None) -> str:
    """The text a prepared model generates after its prompt number `index` (0-based)."""
    loaded = prepared.loaded
    ids = generate_ids(loaded.model, prepared.prompt_ids[index], prepared.generation_config, seed=seed)
    return decode(loaded.tokenizer, ids)


def print_base_comparison(tuned: Prepared, base: Prepared, prompts: list[str], seed: int | None, width: int) -> None:
    """Each prompt answered by the base model and the fine-tuned model, in two columns."""
    for index, prompt in enumerate(prompts):
        columns = [
            (f"{title}: {prepared.loaded.path} ({prepared.prompt_format})", complete(prepared, index, seed))
            for title, prepared in (("base", base), ("fine-tuned", tuned))
        ]
        print(f">>> {prompt}\n{side_by_side(columns, width)}\n", flush=True)


def print_next_tokens(prepared: Prepared, prompts: list[str], k: int) -> None:
    """The K most likely next tokens of each prompt with their probabilities."""
    model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer
    for prompt, ids in zip(prompts, prepared.prompt_ids, strict=True):
        print(f">>> {prompt}")
        print(f"{'rank':>4}  {'probability':>11}  {'id':>7}  token")
        for rank, (token_id, probability) in enumerate(next_token_probabilities(model, ids, k), start=1):
            print(f"{rank:>4}  {probability:>11.6f}  {token_id:>7}  {tokenizer.decode([token_id])!r}")
        print(flush=True)


def run(args: argparse.Namespace) -> None:
    """Run `hfpipe generate`."""
    from transformers.utils import logging

    prompts = check_args(args)
    logging.disable_progress_bar()  # a weight-loading bar on every run is noise for a command-line tool
    prepared = prepare(args.model, prompts, args)
    print_header(prepared, f"top {args.next_token} next tokens" if args.next_token is not None else None)
    width = shutil.get_terminal_size((160, 24)).columns
    if args.next_token is not None:
        print_next_tokens(prepared, prompts, args.next_token)
    elif args.compare:
        print_compare(prepared, prompts, args.seed, width)
    elif args.base:
        base = prepare(args.base, prompts, args, same_format_as=prepared)
        print_header(base)
        print_base_comparison(prepared, base, prompts, args.seed, width)
    elif len(prompts) == 1:
        stream_one(prepared, args.seed)
    else:
        print_all(prepared, prompts, args.seed)
