"""Write the shipped preference pairs for DPO: data/preferences/{train,test}.jsonl.

    .venv/bin/python scripts/make_preferences.py

Each row is {"instruction", "input", "chosen", "rejected"} (plain strings; hfpipe renders the instruction and
input as its SFT recipe does: the '### Instruction:' layout, or one user turn of a chat template). The prompts
are the instructions of the shipped
instruction set (data/instructions, written by scripts/make_instructions.py): train pairs only from its
train.jsonl, test pairs only from its test.jsonl, so that nothing held out from SFT is trained on in DPO.
`instruction` and `input` are the instruction row's; `chosen` is the row's output; `rejected` is a plausible
worse answer of one of three kinds:

- wrong_fact: the same frame with a wrong fact in it: another writer, a wrong genre, another character's
  description, a famous character who is not in the work, a famous line instead of the next one, a famous
  city that is not the capital, a word that is not the opposite;
- evasive: a non-answer ("I am not sure.");
- rambling: the right answer buried in filler, repeated, or stuttering.

The wrong facts come from short fixed lists of likely confusions, none of which is the right answer to any
question of the instruction set, so that a small model can learn them as a pattern: a 1M-parameter model
trained with DPO does not learn to tell a wrong sum or count from a right one, nor an answer to another
question of the set from the answer to this one (both measured at or below chance on held-out prompts), so
sums, counts and reversals get only evasive and rambling answers, and answers to other questions are not used.

Deterministic: the same instruction set and corpus give the same files. Prints the number of pairs per kind.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

from hfpipe.data.corpus import shakespeare_texts

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "instructions"
OUT = ROOT / "data" / "preferences"
SEED = 0
KINDS = ("wrong_fact", "evasive", "rambling")
FIRST_KINDS = ("wrong_fact",) * 4 + ("evasive",) * 3 + ("rambling",) * 3  # cycled over the prompts, shuffled
SECOND_FRACTION = 0.3  # the share of prompts that get a second pair, of another kind

TEMPLATES = {
    "who_wrote": r"Who wrote (?P<title>.+)\?",
    "genre": r"What kind of work is (?P<title>.+)\?",
    "who_is": r"Who is (?P<name>.+?) in (?P<title>.+)\?",
    "three": r"Name three characters from (?P<title>.+)\.",
    "next_line": r"Give the line that follows this one in (?P<title>.+)\.",
    "plus": r"What is (?P<a>\d+) plus (?P<b>\d+)\?",
    "times": r"What is (?P<a>\d+) times (?P<b>\d+)\?",
    "backwards": r"Write this word backwards\.",
    "letters": r"How many letters are in the word '(?P<word>[a-z]+)'\?",
    "capital": r"What is the capital of (?P<country>.+)\?",
    "opposite": r"What is the opposite of '(?P<word>[a-z]+)'\?",
}
NO_WRONG_FACT = ("plus", "times", "backwards", "letters")  # a small model cannot learn which number is wrong

# Other writers of the period and after. Marlowe is left out for the works he is credited with a share in.
AUTHORS = ("Christopher Marlowe", "Ben Jonson", "Edmund Spenser", "John Milton", "John Donne")
NOT_MARLOWE = ("Henry VI", "Passionate Pilgrim")
GENRE_PHRASES = {
    "comedy": "a comedy",
    "tragedy": "a tragedy",
    "history": "a history play",
    "poem": "a poem (or a collection of poems), not a play",
}
# A play is called a poem (several plays were printed as tragedies or histories, so those are not clearly
# wrong); a poem is called a comedy or a history play.
WRONG_GENRES = {"comedy": ("poem",), "tragedy": ("poem",), "history": ("poem",), "poem": ("comedy", "history")}
FAMOUS_NAMES = ("Hamlet", "Romeo", "Juliet", "Othello", "Macbeth", "Falstaff", "Prospero", "Shylock", "Iago", "Puck")
FAMOUS_LINES = (
    "To be, or not to be,--that is the question:--",
    "Now is the winter of our discontent",
    "All the world's a stage,",
    "But soft! what light through yonder window breaks?",
    "To-morrow, and to-morrow, and to-morrow,",
    "The quality of mercy is not strain'd;",
    "The course of true love never did run smooth:",
    "Is this a dagger which I see before me,",
    "Double, double, toil and trouble;",
    "A horse! a horse! my kingdom for a horse!",
)
CITIES = ("Sydney", "New York", "Istanbul", "Milan", "Barcelona", "Toronto", "Geneva")  # no capitals
NOT_OPPOSITES = ("fair", "noble", "gentle", "honest", "merry", "proud")
DESCRIPTIONS = 10  # descriptions of characters no instruction asks about, sampled as wrong descriptions
# Wrong descriptions relate the character to someone named in another play ("father to Hermia"), which cannot
# be true of a character in this one (unlike "his son", "a French lord" or "duke of York").
DESCRIPTION = re.compile(r"(?:[a-z]+ )?[a-z]+ to (?P<who>[A-Z][a-z']+(?: [A-Z][a-z']+)?)")
RANKS = {"King", "Queen", "Duke", "Duchess", "Prince", "Princess", "Lord", "Lady", "Earl", "Cardinal", "Bishop"}

EVASIVE = (
    "I am not sure.",
    "It is hard to say.",
    "I don't know.",
    "That is a difficult question to answer.",
    "I cannot say for certain.",
    "I would rather not guess.",
    "There are many possible answers to that.",
    "Nobody can really know that.",
)
PREAMBLES = (
    "Well, that is a good question, and there is a great deal that could be said about it.",
    "Let me think. Let me think about that for a moment.",
    "Ah, now, that is something people often ask, and the answer is not always what they expect.",
)
CODAS = (
    "But then again, there is a lot more that could be said about that, and I could go on and on.",
    "Or at least that is what I remember, more or less, if I remember it right.",
)

Row = dict[str, str]


def load_module(name: str) -> ModuleType:
    """Import a sibling script (scripts/NAME.py) as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_rows(split: str) -> list[Row]:
    """The instruction rows of one split, each with its template name and the fields parsed from it."""
    rows = []
    for line in (SOURCE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for template, pattern in TEMPLATES.items():
            found = re.fullmatch(pattern, row["instruction"])
            if found:
                rows.append({**row, **found.groupdict(), "template": template})
                break
        else:
            raise ValueError(f"{split}: no template matches {row['instruction']!r}")
    return rows


def description_of(row: Row) -> str:
    """The description in a who_is answer: 'In TITLE, NAME is DESCRIPTION.'."""
    return row["output"].removeprefix(f"In {row['title']}, {row['name']} is ").removesuffix(".")


def three_names(row: Row) -> list[str]:
    """The three names in a 'Name three characters' answer."""
    found = re.fullmatch(r"Three characters from .+ are (.+), (.+) and (.+)\.", row["output"])
    assert found, row["output"]
    return list(found.groups())


def value_of(row: Row) -> str:
    """The value at the end of a capital or opposite answer: 'The capital of X is VALUE.'."""
    return row["output"].rsplit(" is ", 1)[1].rstrip(".").strip("'")


class Sources:
    """The shipped texts by title, and the lists wrong facts are drawn from."""

    def __init__(self, rows: list[Row], rng: random.Random) -> None:
        instructions = load_module("make_instructions")
        titles = instructions.titles()
        self.texts: dict[str, str] = {}
        for path in shakespeare_texts():
            work = path.name.removesuffix("_gut.txt")
            self.texts[titles.get(work, work.replace("_", " ").title())] = path.read_text(encoding="utf-8")
        lines = {line.strip() for text in self.texts.values() for line in text.splitlines()}
        assert all(line in lines for line in FAMOUS_LINES), "a famous line is not in the corpus"
        # None of the wrong values may be a right answer anywhere in the instruction set (train or test).
        answers = " ".join(row["output"] + " " + row["input"] for row in rows)
        named = {row["name"] for row in rows if row["template"] == "who_is"}
        named |= {name for row in rows if row["template"] == "three" for name in three_names(row)}
        self.names = [name for name in FAMOUS_NAMES if name not in named]
        self.lines = [line for line in FAMOUS_LINES if line not in answers]
        self.cities = [city for city in CITIES if city not in answers]
        self.not_opposites = [word for word in NOT_OPPOSITES if f"'{word}'" not in answers]
        described = {description_of(row) for row in rows if row["template"] == "who_is"}
        unused = {
            (description, found["who"].split("'")[0])
            for text in self.texts.values()
            for _, description in instructions.persons(text)
            if description not in described
            and (found := DESCRIPTION.fullmatch(description))
            and found["who"].split()[0] not in RANKS
        }
        self.descriptions = rng.sample(sorted(unused), DESCRIPTIONS)  # (description, the person it names)

    def mentions(self, title: str, name: str) -> bool:
        """Whether the work's text names this person anywhere (case-insensitive, whole words)."""
        return re.search(rf"\b{re.escape(name)}\b", self.texts[title], flags=re.IGNORECASE) is not None


def wrong_fact(row: Row, sources: Sources, rng: random.Random) -> str:
    """The same frame as the answer, with a wrong fact in it."""
    template, title = row["template"], row.get("title", "")
    if template == "who_wrote":
        shared = any(work in title for work in NOT_MARLOWE)
        return f"{title} was written by {rng.choice([a for a in AUTHORS if not (shared and 'Marlowe' in a)])}."
    if template == "genre":
        genre = next(g for g, phrase in GENRE_PHRASES.items() if row["output"].endswith(f" is {phrase}."))
        return f"{title} is {GENRE_PHRASES[rng.choice(WRONG_GENRES[genre])]}."
    if template == "who_is":
        description = rng.choice([d for d, who in sources.descriptions if not sources.mentions(title, who)])
        return f"In {title}, {row['name']} is {description}."
    if template == "three":
        names = three_names(row)
        names[rng.randrange(3)] = rng.choice([n for n in sources.names if not sources.mentions(title, n)])
        return f"Three characters from {title} are {names[0]}, {names[1]} and {names[2]}."
    if template == "next_line":
        return rng.choice(sources.lines)
    if template == "capital":
        return f"The capital of {row['country']} is {rng.choice(sources.cities)}."
    if template == "opposite":
        return f"The opposite of '{row['word']}' is '{rng.choice(sources.not_opposites)}'."
    raise ValueError(f"no wrong facts for {template}")


def evasive(row: Row, sources: Sources, rng: random.Random) -> str:
    """A non-answer."""
    return rng.choice(EVASIVE)


def rambling(row: Row, sources: Sources, rng: random.Random) -> str:
    """The answer padded with filler, repeated, or stuttering."""
    answer = row["output"]
    style = rng.randrange(4)
    if style == 0:
        return f"{rng.choice(PREAMBLES)} {answer}"
    if style == 1:
        return f"{rng.choice(PREAMBLES)} {answer} {rng.choice(CODAS)}"
    if style == 2:
        return " ".join([answer] * rng.choice((2, 3)))
    body, end = (answer[:-1], answer[-1]) if answer[-1] in ".!?;:," else (answer, "")
    return f"{body}{(' ' + body.split()[-1]) * rng.choice((2, 3))}{end}"


BUILDERS = {"wrong_fact": wrong_fact, "evasive": evasive, "rambling": rambling}


def make_pairs(rows: list[Row], sources: Sources, rng: random.Random) -> tuple[list[Row], Counter[str]]:
    """One pair per prompt, and a second pair of another kind for a seeded share of the prompts."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    second = set(order[: round(len(order) * SECOND_FRACTION)])
    rng.shuffle(order)
    pairs: list[Row] = []
    counts: Counter[str] = Counter()
    for position, index in enumerate(order):
        row = rows[index]
        allowed = [k for k in KINDS if not (k == "wrong_fact" and row["template"] in NO_WRONG_FACT)]
        first = FIRST_KINDS[position % len(FIRST_KINDS)]
        kinds = [first if first in allowed else rng.choice(allowed)]
        if index in second:
            kinds.append(rng.choice([k for k in allowed if k != kinds[0]]))
        for kind in kinds:
            rejected = BUILDERS[kind](row, sources, rng)
            question = {"instruction": row["instruction"], "input": row["input"]}
            pairs.append({**question, "chosen": row["output"], "rejected": rejected})
            counts[kind] += 1
    return pairs, counts


def check(pairs: list[Row]) -> None:
    """No empty field, no chosen equal to its rejected, no repeated pair."""
    for pair in pairs:
        assert all(isinstance(v, str) and (v.strip() or k == "input") for k, v in pair.items()), pair
        assert pair["chosen"] != pair["rejected"], pair
    assert len({tuple(p.values()) for p in pairs}) == len(pairs), "repeated pairs"


def main() -> None:
    rng = random.Random(SEED)
    train, test = read_rows("train"), read_rows("test")
    sources = Sources(train + test, rng)
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        pairs, counts = make_pairs(rows, sources, rng)
        check(pairs)
        with open(OUT / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
        kinds = ", ".join(f"{kind} {counts[kind]}" for kind in KINDS)
        print(f"{OUT / split}.jsonl: {len(pairs)} pairs from {len(rows)} prompts ({kinds})")


if __name__ == "__main__":
    main()
