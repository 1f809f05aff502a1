"""Write the shipped verifiable task for GRPO: short additions and subtractions whose answer is one number.

    python scripts/make_arithmetic.py        # writes data/arithmetic/{train,test}.jsonl

Each row is {"instruction": "What is 17 + 25? Answer with the number only.", "answer": "42"}. The held-out file
holds operand pairs never in the training file, so held-out accuracy measures prompts never trained on. Seeded:
the same files every time.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "What is {a} {op} {b}? Answer with the number only."


def all_problems() -> list[tuple[int, str, int]]:
    """Every (a, op, b) with operands 0-20 for addition and 0-20 minus a smaller one for subtraction."""
    problems = [(a, "+", b) for a in range(21) for b in range(21)]
    problems += [(a, "-", b) for a in range(21) for b in range(a + 1)]
    return problems


def row(a: int, op: str, b: int) -> dict[str, str]:
    """One prompt row and its answer."""
    answer = a + b if op == "+" else a - b
    return {"instruction": INSTRUCTION.format(a=a, op=op, b=b), "answer": str(answer)}


def main() -> None:
    """Shuffle every problem with a fixed seed and split it into training and held-out rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "arithmetic")
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problems = all_problems()
    random.Random(args.seed).shuffle(problems)
    splits = {"test": problems[: args.test_rows], "train": problems[args.test_rows :]}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row(*problem)) + "\n" for problem in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
