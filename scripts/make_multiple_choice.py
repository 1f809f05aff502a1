"""Write the shipped multiple-choice set about the corpus: data/eval/shakespeare_mc.jsonl (HellaSwag format).

    .venv/bin/python scripts/make_multiple_choice.py

Each row is {"context": str, "endings": [4 str], "label": int}: the context is the start of a speech from a play
(the speaker's name and one or two lines) or two lines of a sonnet, and the correct ending is the line that
follows it. The three wrong endings are a line from elsewhere in the same work (at least DISTANCE lines away,
or from another sonnet) of about the same length and with a first letter of the same case, as HellaSwag's
adversarial endings are, and both real lines with their words shuffled. Each shuffled line has the same words
and length as a real one, so word frequencies and lengths tell nothing: a model at chance (0.25) has not
learned word order; one that knows word order but ignores the context reaches about 0.5 (it rules out the two
shuffled lines); above 0.5 it is using the context. Only the validation works (data/shakespeare/validation,
held out from pretraining) are used, so the set measures how well a model pretrained on data/shakespeare/train
continues unseen text.

Convention: the context ends without trailing whitespace and every ending starts with "\n" (it is the next
line), so that context + ending is the text as printed, and a scorer that appends the ending's tokens to the
context's sees the same tokens as the joined text would give. Lines are stripped of surrounding spaces.
Labels are balanced over the four positions. Deterministic: the same corpus gives the same file.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "shakespeare" / "validation"
OUT = ROOT / "data" / "eval" / "shakespeare_mc.jsonl"
SEED = 0
PER_WORK = 50
DISTANCE = 100  # lines between an item and its distractors
MIN_CHARS, MAX_CHARS = 20, 75  # of an ending
TOLERANCES = (0.15, 0.25, 0.4)  # length of a distractor within this fraction of the correct ending's, tried in turn
SPEAKER = re.compile(r"[A-Z][A-Z .'&-]*\.")  # "SIR ANDREW.", "KING HENRY."
ROMAN = re.compile(r"[IVXLC]+")  # a sonnet's number

Item = dict[str, object]


def usable(line: str) -> bool:
    """A line of verse or prose that can be an ending: not a stage direction, a heading or a speaker's name."""
    return MIN_CHARS <= len(line) <= MAX_CHARS and "[" not in line and "]" not in line and not line.isupper()


def play_lines(text: str) -> tuple[list[tuple[int, str]], list[tuple[str, list[tuple[int, str]]]]]:
    """(line number, line) of every usable speech line, and the speeches: (speaker, [(line number, line)])."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(("ACT ", "SCENE ")))  # after the persons
    pool, speeches = [], []
    i = start
    while i < len(lines):
        if SPEAKER.fullmatch(lines[i]) and i + 1 < len(lines) and lines[i + 1]:
            speech = []
            j = i + 1
            while j < len(lines) and lines[j]:
                speech.append((j, lines[j]))
                j += 1
            speeches.append((lines[i], speech))
            pool += [(n, line) for n, line in speech if usable(line)]
            i = j
        else:
            i += 1
    return pool, speeches


def play_items(text: str) -> tuple[list[tuple[int, str]], list[Item]]:
    """Distractor pool and candidate items of a play: a speaker's name and the speech's first one or two lines."""
    pool, speeches = play_lines(text)
    items = []
    for speaker, speech in speeches:
        for shown in (1, 2):
            if len(speech) > shown and usable(speech[shown][1]) and all("[" not in x for _, x in speech[:shown]):
                context = "\n".join([speaker] + [line for _, line in speech[:shown]])
                items.append({"context": context, "answer": speech[shown][1], "at": speech[shown][0], "group": None})
    return pool, items


def sonnet_items(text: str) -> tuple[list[tuple[int, str]], list[Item]]:
    """Distractor pool and candidate items of the sonnets: two lines of a sonnet and the next one."""
    lines = [line.strip() for line in text.splitlines()]
    pool, items, sonnet, number = [], [], [], ""
    for n, line in enumerate([*lines, "END"]):
        if ROMAN.fullmatch(line) or line == "END":
            for k in range(len(sonnet) - 2):
                (_, first), (_, second), (at, answer) = sonnet[k : k + 3]
                if usable(answer):
                    items.append({"context": f"{first}\n{second}", "answer": answer, "at": at, "group": number})
            sonnet, number = [], line
        elif line and number:
            sonnet.append((n, line))
            if usable(line):
                pool.append((n, line))
    return pool, items


def scrambled(line: str, rng: random.Random) -> str:
    """The line with its words in a shuffled order (a different one)."""
    words = line.split()
    while True:
        rng.shuffle(words)
        if " ".join(words) != line:
            return " ".join(words)


def elsewhere(item: Item, pool: list[tuple[int, str]], groups: dict[int, str], rng: random.Random) -> str:
    """A line from elsewhere in the work, of about the correct ending's length and first-letter case."""
    answer = str(item["answer"])
    far = {
        line
        for n, line in pool
        if abs(n - int(item["at"])) >= DISTANCE
        and (item["group"] is None or groups.get(n) != item["group"])
        and line != answer
        and line[0].isupper() == answer[0].isupper()
    }
    for tolerance in TOLERANCES:
        close = sorted(line for line in far if abs(len(line) - len(answer)) <= max(4, tolerance * len(answer)))
        if close:
            return rng.choice(close)
    raise ValueError(f"no distractors for {answer!r}")


def sonnet_groups(text: str) -> dict[int, str]:
    """Line number -> the number of the sonnet it belongs to."""
    groups, number = {}, ""
    for n, line in enumerate(line.strip() for line in text.splitlines()):
        if ROMAN.fullmatch(line):
            number = line
        elif line:
            groups[n] = number
    return groups


def main() -> None:
    rng = random.Random(SEED)
    paths = sorted(SOURCE.glob("*.txt"))
    if not paths:
        raise SystemExit(f"{SOURCE} holds no texts: run bash scripts/setup.sh (it prepares data/shakespeare)")
    rows = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        sonnets = path.stem == "sonnets"
        pool, items = sonnet_items(text) if sonnets else play_items(text)
        groups = sonnet_groups(text) if sonnets else {}
        picked = sorted(rng.sample(range(len(items)), PER_WORK))
        labels = [k % 4 for k in range(PER_WORK)]
        rng.shuffle(labels)
        for index, label in zip(picked, labels, strict=True):
            item = items[index]
            answer = str(item["answer"])
            other = elsewhere(item, pool, groups, rng)
            endings = [other, scrambled(other, rng), scrambled(answer, rng)]
            rng.shuffle(endings)
            endings.insert(label, answer)
            rows.append({"context": item["context"], "endings": [f"\n{e}" for e in endings], "label": label})
        print(f"{path.stem}: {PER_WORK} rows from {len(items)} candidates")
    assert all(len(set(row["endings"])) == 4 and not row["context"][-1].isspace() for row in rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{OUT}: {len(rows)} rows")


if __name__ == "__main__":
    main()
