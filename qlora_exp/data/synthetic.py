"""Seeded instruction data with verifiable answers, in alpaca form (some in Chinese).

Every answer is computed, so exact-match accuracy of a model's generation is meaningful and a
default run can show that training works without any download.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

Example = dict[str, str]

_WORDS = (
    "apple",
    "banana",
    "cherry",
    "dragon",
    "planet",
    "river",
    "silver",
    "window",
    "orange",
    "garden",
    "rocket",
    "spring",
    "coffee",
    "marble",
    "pencil",
    "summer",
    "winter",
    "yellow",
    "purple",
    "island",
    "forest",
    "castle",
    "mirror",
    "bottle",
)


def _numbers(rng: random.Random, count: int) -> list[int]:
    return [rng.randint(0, 99) for _ in range(count)]


def _add(rng: random.Random, zh: bool) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    instruction = f"计算 {a} + {b} 的结果。" if zh else f"What is {a} + {b}?"
    return {"instruction": instruction, "input": "", "output": str(a + b)}


def _subtract(rng: random.Random, zh: bool) -> Example:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    instruction = f"计算 {a} - {b} 的结果。" if zh else f"What is {a} - {b}?"
    return {"instruction": instruction, "input": "", "output": str(a - b)}


def _multiply(rng: random.Random, zh: bool) -> Example:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    instruction = f"计算 {a} × {b} 的结果。" if zh else f"What is {a} times {b}?"
    return {"instruction": instruction, "input": "", "output": str(a * b)}


def _sort(rng: random.Random, zh: bool) -> Example:
    values = _numbers(rng, rng.randint(3, 6))
    instruction = "将下列数字按从小到大排序。" if zh else "Sort these numbers in ascending order."
    return {
        "instruction": instruction,
        "input": ", ".join(map(str, values)),
        "output": ", ".join(map(str, sorted(values))),
    }


def _maximum(rng: random.Random, zh: bool) -> Example:
    values = _numbers(rng, rng.randint(3, 6))
    instruction = "下列数字中最大的是哪个？" if zh else "Which of these numbers is the largest?"
    return {"instruction": instruction, "input": ", ".join(map(str, values)), "output": str(max(values))}


def _reverse(rng: random.Random, zh: bool) -> Example:
    word = rng.choice(_WORDS)
    instruction = "将下面的单词倒序写出。" if zh else "Write this word backwards."
    return {"instruction": instruction, "input": word, "output": word[::-1]}


def _count_letter(rng: random.Random, zh: bool) -> Example:
    word = rng.choice(_WORDS)
    letter = rng.choice(word)
    instruction = (
        f"字母 '{letter}' 在下面的单词中出现了几次？"
        if zh
        else f"How many times does the letter '{letter}' appear in this word?"
    )
    return {"instruction": instruction, "input": word, "output": str(word.count(letter))}


def _uppercase(rng: random.Random, zh: bool) -> Example:
    text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
    instruction = "把下面的字母全部转换成大写。" if zh else "Convert these letters to uppercase."
    return {"instruction": instruction, "input": text, "output": text.upper()}


TASKS: dict[str, Callable[[random.Random, bool], Example]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "sort": _sort,
    "maximum": _maximum,
    "reverse": _reverse,
    "count_letter": _count_letter,
    "uppercase": _uppercase,
}


def generate_synthetic_examples(count: int, seed: int, zh_fraction: float = 0.3) -> list[Example]:
    """`count` alpaca rows drawn from every task in turn; the same seed gives the same rows."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    rows = []
    for index in range(count):
        zh = rng.random() < zh_fraction
        row = TASKS[names[index % len(names)]](rng, zh)
        rows.append({**row, "task": names[index % len(names)]})
    rng.shuffle(rows)
    return rows


def generate_synthetic_preferences(count: int, seed: int, zh_fraction: float = 0.3) -> list[Example]:
    """`count` preference rows (alpaca prompt, `chosen` = the computed answer, `rejected` = a wrong one):
    the answer of another example of the same task, so that both answers have the task's form and only
    the content tells them apart. The same seed gives the same rows."""
    examples = generate_synthetic_examples(count, seed, zh_fraction)
    answers: dict[str, list[str]] = {}
    for example in examples:
        answers.setdefault(example["task"], []).append(example["output"])
    rng = random.Random(seed + 2)  # its own stream: the prompts and answers stay those of the SFT set
    rows = []
    for example in examples:
        wrong = [answer for answer in answers[example["task"]] if answer != example["output"]]
        # A task with a single distinct answer among few rows (e.g. count_letter's "1") has no wrong
        # answer to borrow; the correct one with a digit appended is still of the task's form.
        rejected = rng.choice(wrong) if wrong else example["output"] + str(rng.randint(1, 9))
        prompt = {key: value for key, value in example.items() if key != "output"}
        rows.append({**prompt, "chosen": example["output"], "rejected": rejected})
    return rows
