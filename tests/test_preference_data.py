"""Preference pairs (method=dpo): every layout becomes the same prompt + chosen + rejected, auto-detected;
bad rows are counted drops; the tokenized pairs carry SFT's exact masks (Chinese included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase, TrainerControl, TrainerState, TrainingArguments

from qlora_exp.data.formats import MALFORMED, MISSING_FIELD, Drop, detect_format
from qlora_exp.data.preference import (
    EMPTY_ANSWER,
    SAME_ANSWER,
    PreferenceDataModule,
    PreferencePair,
    detect_preference_format,
    to_pair,
)
from qlora_exp.data.synthetic import generate_synthetic_examples, generate_synthetic_preferences
from qlora_exp.data.tokenization import OVER_LENGTH
from qlora_exp.errors import ConfigError, DataError
from qlora_exp.schema import DataColumnsConfig, DataConfig, to_schema
from qlora_exp.tracking import TrackingCallback
from tests.support import compose_config

COLUMNS = DataColumnsConfig()
SKY = [{"role": "user", "content": "What colour is the sky?"}]
BLUE, GREEN = "Blue.", "Green."


def user_then(answer: str) -> list[dict[str, str]]:
    return [*SKY, {"role": "assistant", "content": answer}]


# (row, format it is detected as, the pair it reads as)
LAYOUTS: dict[str, tuple[dict[str, Any], str, PreferencePair]] = {
    "trl strings (raw, whitespace kept)": (
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        "preference",
        PreferencePair([{"role": "user", "content": "The sky is"}], " blue.", " green.", raw=True),
    ),
    "trl message lists": (
        {
            "prompt": SKY,
            "chosen": [{"role": "assistant", "content": BLUE}],
            "rejected": [{"role": "assistant", "content": GREEN}],
        },
        "preference",
        PreferencePair(SKY, BLUE, GREEN),
    ),
    "trl implicit prompt (whole conversations)": (
        {"chosen": user_then(BLUE), "rejected": user_then(GREEN), "score_chosen": 8.0},
        "preference",
        PreferencePair(SKY, BLUE, GREEN),
    ),
    "prompt column repeated inside the conversations (and an SFT messages column)": (
        {
            "prompt": SKY[0]["content"],
            "chosen": user_then(BLUE),
            "rejected": user_then(GREEN),
            "messages": [],
        },
        "preference",
        PreferencePair(SKY, BLUE, GREEN),
    ),
    "implicit prompt in strings (Anthropic HH)": (
        {"chosen": "\n\nHuman: Sky?\n\nAssistant: Blue.", "rejected": "\n\nHuman: Sky?\n\nAssistant: Green."},
        "preference",
        PreferencePair(
            [{"role": "user", "content": "\n\nHuman: Sky?\n\nAssistant:"}], " Blue.", " Green.", raw=True
        ),
    ),
    "sharegpt conversations + message objects (Chinese)": (
        {
            "conversations": [{"from": "human", "value": "天空是什么颜色？"}],
            "chosen": {"from": "gpt", "value": "蓝色。"},
            "rejected": {"from": "gpt", "value": "绿色。"},
        },
        "sharegpt",
        PreferencePair([{"role": "user", "content": "天空是什么颜色？"}], "蓝色。", "绿色。"),
    ),
    "messages history + strings": (
        {"messages": [{"role": "system", "content": "Be brief."}, *SKY], "chosen": BLUE, "rejected": GREEN},
        "messages",
        PreferencePair([{"role": "system", "content": "Be brief."}, *SKY], BLUE, GREEN),
    ),
    "alpaca + strings, with history": (
        {"instruction": "Sky?", "input": "", "history": [["Hi", "Hello"]], "chosen": BLUE, "rejected": GREEN},
        "alpaca",
        PreferencePair(
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Sky?"},
            ],
            BLUE,
            GREEN,
        ),
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_detected_and_read_as_one_pair(layout: str) -> None:
    row, fmt, pair = LAYOUTS[layout]
    assert detect_preference_format(set(row), COLUMNS) == fmt
    assert to_pair(row, fmt, COLUMNS, {}) == pair


@pytest.mark.parametrize(
    ("row", "fmt", "reason", "detail"),
    [
        ({"prompt": "x", "chosen": "same", "rejected": " same "}, "preference", SAME_ANSWER, "the same"),
        ({"prompt": "x", "chosen": "  ", "rejected": "a"}, "preference", EMPTY_ANSWER, "'chosen'"),
        ({"prompt": "x", "chosen": "a"}, "preference", EMPTY_ANSWER, "'rejected'"),
        (
            {
                "conversations": SKY,
                "chosen": {"from": "gpt", "value": ""},
                "rejected": {"from": "gpt", "value": "a"},
            },
            "sharegpt",
            EMPTY_ANSWER,
            "'chosen'",
        ),
        (
            {"chosen": "Sky is blue", "rejected": "Grass is green"},
            "preference",
            MISSING_FIELD,
            "no beginning",
        ),
        ({"chosen": "The answer", "rejected": "The answer is 4"}, "preference", EMPTY_ANSWER, "beginning"),
        (
            {"prompt": "Another question?", "chosen": user_then(BLUE), "rejected": user_then(GREEN)},
            "preference",
            MALFORMED,
            "differs from the prompt",
        ),
        (  # the two conversations part before their last turn: not one pair of final answers
            {"chosen": [*user_then("a"), *user_then(BLUE)], "rejected": [*user_then("b"), *user_then(GREEN)]},
            "preference",
            MALFORMED,
            "one assistant answer",
        ),
        (
            {"messages": SKY, "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
            "messages",
            MALFORMED,
            "one",
        ),
        ({"instruction": "", "chosen": BLUE, "rejected": GREEN}, "alpaca", MISSING_FIELD, "instruction"),
        (["not", "an", "object"], "preference", MALFORMED, "list"),
    ],
)
def test_unusable_rows_are_drops_with_a_reason(row: Any, fmt: str, reason: str, detail: str) -> None:
    result = to_pair(row, fmt, COLUMNS, {})
    assert isinstance(result, Drop) and result.reason == reason and detail in result.detail, result


def test_rows_without_chosen_and_rejected_are_refused_with_the_columns_fix() -> None:
    with pytest.raises(DataError, match=r"data\.columns\.chosen"):
        detect_preference_format({"prompt", "completion"}, COLUMNS)
    # ...and SFT's detection points preference pairs at method=dpo.
    with pytest.raises(DataError, match="method=dpo"):
        detect_format([{"question": "q", "chosen": "a", "rejected": "b"}], COLUMNS)


def test_renamed_columns_are_read() -> None:
    columns = DataColumnsConfig(prompt="question", chosen="good", rejected="bad")
    row = {"question": "Sky?", "good": BLUE, "bad": GREEN}
    assert detect_preference_format(set(row), columns) == "preference"
    assert to_pair(row, "preference", columns, {}).chosen == BLUE  # type: ignore[union-attr]


def test_synthetic_pairs_prefer_the_computed_answer_over_another_of_the_same_task() -> None:
    pairs = generate_synthetic_preferences(64, seed=3)
    examples = generate_synthetic_examples(64, seed=3)
    assert [p["chosen"] for p in pairs] == [e["output"] for e in examples]
    assert [p["instruction"] for p in pairs] == [e["instruction"] for e in examples]
    assert all(p["rejected"] != p["chosen"] for p in pairs)
    answers_by_task: dict[str, set[str]] = {}
    for example in examples:
        answers_by_task.setdefault(example["task"], set()).add(example["output"])
    borrowed = sum(p["rejected"] in answers_by_task[p["task"]] for p in pairs)
    assert borrowed >= 60  # the rest: a task with one distinct answer gets the answer with a digit added
    assert generate_synthetic_preferences(64, seed=3) == pairs
    assert any("计算" in p["instruction"] for p in pairs)  # Chinese rows too


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def preference_module(
    path: Path, tokenizer: PreTrainedTokenizerBase, **settings: Any
) -> PreferenceDataModule:
    cfg = DataConfig(source="local", path=str(path), val_fraction=0.25, cache=False, **settings)
    module = PreferenceDataModule(cfg, tokenizer, seed=1, batch_size=2)
    module.setup()
    return module


def test_chinese_sharegpt_pairs_are_masked_exactly(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer = tiny_tokenizer
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "简短回答。"},
                {"from": "human", "value": f"{i} 加 {i} 等于几？"},
            ],
            "chosen": {"from": "gpt", "value": f"等于 {2 * i}。"},
            "rejected": {"from": "gpt", "value": f"等于 {2 * i + 1}。"},
        }
        for i in range(8)
    ]
    module = preference_module(write_jsonl(tmp_path / "zh.jsonl", rows), tokenizer)
    assert module.stats.format == "sharegpt" and module.stats.train_rows + module.stats.val_rows == 8
    pairs = [*module.train_dataset, *module.val_dataset]  # type: ignore[misc]
    for row in pairs:
        i = int(tokenizer.decode(row["prompt_ids"]).split("加")[0].split()[-1])
        prompt = [
            {"role": "system", "content": "简短回答。"},
            {"role": "user", "content": f"{i} 加 {i} 等于几？"},
        ]
        rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        # The prompt is exactly the template's rendering up to the model's turn; each answer is what the
        # whole rendering adds after it (the answer and the end of its turn), nothing of the prompt.
        assert row["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        for answer, ids in (
            (f"等于 {2 * i}。", row["chosen_ids"]),
            (f"等于 {2 * i + 1}。", row["rejected_ids"]),
        ):
            whole = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": answer}], tokenize=False
            )
            assert row["prompt_ids"] + ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids).startswith(answer)
    # The conversation kept for held-out samples is the prompt with the chosen answer as reference.
    sample = module.val_conversations[0]
    assert sample.messages[-1]["content"].startswith("等于") and sample.messages[-2]["role"] == "user"


def test_history_answers_are_prompt_not_trained(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [
        {
            "instruction": f"And {i} + 1?",
            "history": [["What is 1 + 1?", "2"]],
            "chosen": str(i + 1),
            "rejected": "0",
        }
        for i in range(1, 9)
    ]
    module = preference_module(write_jsonl(tmp_path / "alpaca.jsonl", rows), tiny_tokenizer)
    row = module.train_dataset[0]  # type: ignore[index]
    assert "2<end_of_turn>" in tiny_tokenizer.decode(row["prompt_ids"])  # the earlier answer is context
    assert tiny_tokenizer.decode(row["rejected_ids"]) == "0<end_of_turn>\n"


def test_raw_string_pairs_are_tokenized_as_they_are(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [{"prompt": f"The sky {i} is", "chosen": " blue.", "rejected": " green."} for i in range(4)]
    module = preference_module(write_jsonl(tmp_path / "trl.jsonl", rows), tiny_tokenizer)
    row = module.train_dataset[0]  # type: ignore[index]
    eos = tiny_tokenizer.eos_token_id
    assert row["chosen_ids"] == [*tiny_tokenizer(" blue.", add_special_tokens=False)["input_ids"], eos]
    assert row["rejected_ids"] == [*tiny_tokenizer(" green.", add_special_tokens=False)["input_ids"], eos]


def test_drops_are_counted_once_per_pair_by_reason(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    good = [{"prompt": SKY, "chosen": f"Blue {i}.", "rejected": f"Green {i}."} for i in range(6)]
    bad = [
        {"prompt": SKY, "chosen": "Same.", "rejected": "Same."},
        {"prompt": SKY, "chosen": "", "rejected": "Green."},
        {"prompt": SKY, "chosen": "Blue.", "rejected": "word " * 200},  # over max_length on one side
    ]
    module = preference_module(
        write_jsonl(tmp_path / "mixed.jsonl", good + bad), tiny_tokenizer, max_length=64
    )
    stats = module.stats.to_dict()
    assert stats["rows_dropped"] == {SAME_ANSWER: 1, EMPTY_ANSWER: 1, OVER_LENGTH: 1}
    assert stats["rows_kept"] == 6
    assert "rejected answer:" in stats["rows_dropped_examples"][OVER_LENGTH][0]
    assert "mixed.jsonl:9" in stats["rows_dropped_examples"][OVER_LENGTH][0]
    # Both sequences of every kept pair are counted in the length statistics.
    assert len(module.stats.lengths) == 2 * stats["train_rows"]


def test_nothing_usable_is_an_error_that_says_why(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 4
    with pytest.raises(DataError, match=SAME_ANSWER):
        preference_module(write_jsonl(tmp_path / "same.jsonl", rows), tiny_tokenizer)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("method.beta=0.2",), "method.beta"),  # a DPO-only setting under sft
        (("method.loss_type=ipo",), "method.loss_type"),
        (("method.init_from=/some/run",), "method.init_from"),
        (("data.format=preference",), "data.format"),  # pairs need a preference method
        (("method=dpo", "method.beta=0"), "method.beta"),
        (("method=dpo", "method.loss_type=exo_pair"), "method.loss_type"),
        (("method=dpo", "data.format=prompt_completion"), "data.format"),
        (("method=dpo", "data.packing=padding_free"), "data.packing"),
        (("method=dpo", "data.train_on_prompt=true"), "data.train_on_prompt"),
    ],
)
def test_settings_a_method_does_not_read_are_refused(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_schema(compose_config(*overrides))


def test_dpo_defaults() -> None:
    method = to_schema(compose_config("method=dpo")).method
    assert (method.name, method.beta, method.loss_type, method.init_from) == ("dpo", 0.1, "sigmoid", None)
    assert to_schema(compose_config("experiment=beta_lr_grid")).method.name == "dpo"


class RecordingTracker:
    """What TrackingCallback needs of a Tracker: log() and the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.logged: list[dict[str, float]] = []

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append(metrics)


@pytest.mark.parametrize(("perplexity", "logged"), [(True, True), (False, False)])
def test_perplexity_is_tracked_for_sft_losses_only(tmp_path: Path, perplexity: bool, logged: bool) -> None:
    tracker = RecordingTracker(tmp_path)
    callback = TrackingCallback(tracker, perplexity=perplexity)  # type: ignore[arg-type]
    state = TrainerState()
    state.log_history = [{"eval_loss": 0.69, "step": 0}]
    callback.on_log(
        TrainingArguments(output_dir=str(tmp_path)), state, TrainerControl(), logs={"eval_loss": 0.69}
    )
    assert ("eval_perplexity" in tracker.logged[0]) == logged
