"""Unit tests: exact-match scoring, sample selection, eval config rules, batched generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_exp.data.formats import Conversation
from qlora_exp.data.tokenization import IGNORE_INDEX, tokenize_raw
from qlora_exp.embedded import resolve_embedded
from qlora_exp.errors import ConfigError
from qlora_exp.generation import (
    build_generation_config,
    can_prompt,
    exact_match_rate,
    generate_replies,
    held_out_prompt,
    is_exact_match,
    prompt_token_ids,
    select_conversations,
    split_reference,
)
from qlora_exp.model import build_quantized_model, load_tokenizer
from qlora_exp.schema import EvalConfig, to_schema
from qlora_exp.training import eval_history, perplexity
from tests.support import compose_config


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_exact_match_trims_whitespace_but_keeps_case() -> None:
    assert is_exact_match(" 42\n", "42")
    assert not is_exact_match("abc", "ABC")
    assert not is_exact_match("4 2", "42")
    assert exact_match_rate(["1", "2", "x", ""], ["1", "2", "3", "4"]) == 0.5
    assert exact_match_rate([], []) == 0.0
    with pytest.raises(ValueError, match="2 generations for 1 references"):
        exact_match_rate(["1", "2"], ["1"])


def test_split_reference_takes_the_last_assistant_turn() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        *conversation("first?", "one"),
        *conversation("second?", "two"),
    ]
    prompt, reference = split_reference(messages)
    assert reference == "two"
    assert prompt == messages[:-1]
    with pytest.raises(ValueError, match="no assistant turn"):
        split_reference([{"role": "user", "content": "hi"}])


def test_sample_selection_is_seeded_ordered_and_bounded() -> None:
    pool = [conversation(f"q{i}", str(i)) for i in range(50)]
    first = select_conversations(pool, 10, seed=3)
    assert first == select_conversations(pool, 10, seed=3)
    assert first != select_conversations(pool, 10, seed=4)
    indices = [pool.index(c) for c in first]
    assert indices == sorted(indices) and len(set(indices)) == 10
    assert select_conversations(pool[:5], 10, seed=3) == pool[:5]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["eval.temperature=0.7"], "eval.temperature"),
        (["eval.num_samples=-1"], "eval.num_samples"),
        (["eval.do_sample=true", "eval.top_p=0"], "eval.top_p"),
        (["trainer.eval_steps=0", "eval.samples_every_eval=true"], "eval.samples_every_eval"),
        (["trainer.eval_steps=0", "trainer.load_best_model_at_end=true"], "trainer.load_best_model_at_end"),
        (["trainer.eval_steps=0", "trainer.early_stopping_patience=2"], "trainer.early_stopping_patience"),
        (["trainer.eval_steps=10", "trainer.early_stopping_patience=0"], "trainer.early_stopping_patience"),
    ],
)
def test_impossible_eval_settings_fail_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_schema(compose_config("experiment=smoke", *overrides))


def test_eval_settings_that_fit_together_validate() -> None:
    schema = to_schema(
        compose_config(
            "experiment=smoke",
            "trainer.eval_steps=2",
            "trainer.early_stopping_patience=2",
            "trainer.load_best_model_at_end=true",
            "eval.samples_every_eval=true",
            "eval.do_sample=true",
            "eval.temperature=0.7",
        )
    )
    assert schema.trainer.eval_steps == 2 and schema.eval.temperature == 0.7


def test_eval_history_lists_every_evaluation_with_perplexity() -> None:
    log = [{"eval_loss": 6.5, "step": 0}, {"loss": 6.0, "step": 1}, {"eval_loss": 5.0, "step": 2}]
    history = eval_history(log)
    assert [(h["step"], h["eval_loss"]) for h in history] == [(0, 6.5), (2, 5.0)]
    assert history[1]["perplexity"] == pytest.approx(perplexity(5.0))


@pytest.fixture(scope="module")
def untrained_model(embedded_cache: object) -> tuple[torch.nn.Module, object]:
    schema = to_schema(compose_config("experiment=smoke"))
    tokenizer = load_tokenizer(schema.model)
    torch.manual_seed(0)
    return build_quantized_model(schema.model, schema.lora), tokenizer


def test_generation_stops_at_the_templates_end_of_turn(untrained_model: tuple) -> None:
    model, tokenizer = untrained_model
    config = build_generation_config(EvalConfig(), model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in config.eos_token_id
    assert config.do_sample is False and config.max_new_tokens == EvalConfig().max_new_tokens


@pytest.mark.slow
def test_batched_left_padded_generation_matches_one_by_one(untrained_model: tuple) -> None:
    model, tokenizer = untrained_model
    prompts = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "user", "content": "Sort these numbers in ascending order.\n\n5, 3, 9, 1, 12, 40"}],
        [{"role": "user", "content": "将下面的单词倒序写出。\n\napple"}],
    ]
    cfg = EvalConfig(max_new_tokens=6, batch_size=3)
    batched = generate_replies(model, tokenizer, prompts, cfg)
    single = [generate_replies(model, tokenizer, [p], cfg)[0] for p in prompts]
    assert batched == single
    assert all(batched), "a random base model never ends a turn: every reply should have text"
    model.train()
    generate_replies(model, tokenizer, prompts[:1], cfg)
    assert model.training, "generation must give the Trainer its model back in train mode"


def test_generation_runs_a_flex_attention_model_with_eager_attention_and_restores_it(
    untrained_model: tuple,
) -> None:
    model, tokenizer = untrained_model
    base = model.get_base_model()
    original = base.config._attn_implementation
    base.set_attn_implementation("flex_attention")  # as the Gemma-2 preset trains
    seen: list[str] = []
    hook = base.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation)
    )
    try:
        generate_replies(
            model, tokenizer, [[{"role": "user", "content": "Hi"}]], EvalConfig(max_new_tokens=2)
        )
        assert seen and set(seen) == {"eager"}
        assert base.config._attn_implementation == "flex_attention", "training must get flex back"
    finally:
        hook.remove()
        base.set_attn_implementation(original)


@pytest.fixture(params=[False, True], ids=["no-bos", "bos"])
def raw_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    """The embedded tokenizer as it is (no BOS), and adding a BOS as Gemma's and Llama's do."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))
    tokenizer.add_bos_token = request.param
    return tokenizer


@pytest.mark.parametrize(
    "text", ["Once upon a time there was a small dog.", "从前有一只小狗，它很喜欢跑步。", "狗很好"]
)
def test_a_text_row_is_continued_from_the_first_half_of_its_training_tokens(
    raw_tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    turn = [{"role": "assistant", "content": text}]
    sample = held_out_prompt(Conversation(turn, raw=True), raw_tokenizer)
    # The prompt is a prefix of the ids training saw, the BOS included where the tokenizer adds one ...
    assert tokenize_raw(turn, raw_tokenizer)["input_ids"][: len(sample.token_ids)] == sample.token_ids
    assert (sample.token_ids[0] == raw_tokenizer.bos_token_id) == raw_tokenizer.add_bos_token
    # ... holding half of the text's tokens (more only to end on a whole character: "狗很好") ...
    half = len(raw_tokenizer(text, add_special_tokens=False)["input_ids"]) // 2
    assert half <= len(sample.token_ids) - int(raw_tokenizer.add_bos_token) <= half + 3
    # ... and prompt and reference are the text cut in two.
    assert sample.text + sample.reference == text and sample.text and sample.reference
    assert "\ufffd" not in sample.text + sample.reference


def test_a_one_token_text_is_still_a_prompt(raw_tokenizer: PreTrainedTokenizerBase) -> None:
    sample = held_out_prompt(Conversation([{"role": "assistant", "content": "a"}], raw=True), raw_tokenizer)
    assert (sample.text, sample.reference) == ("a", "")


def test_a_raw_prompt_completion_pair_prompts_with_the_untrained_head_of_its_training_ids(
    raw_tokenizer: PreTrainedTokenizerBase,
) -> None:
    messages = [{"role": "user", "content": "What is 3 + 5?"}, {"role": "assistant", "content": " 8"}]
    sample = held_out_prompt(Conversation(messages, raw=True), raw_tokenizer)
    trained = tokenize_raw(messages, raw_tokenizer)
    length = len(sample.token_ids)
    assert trained["input_ids"][:length] == sample.token_ids
    assert set(trained["labels"][:length]) == {IGNORE_INDEX} and trained["labels"][length] != IGNORE_INDEX
    assert (sample.text, sample.reference) == ("What is 3 + 5?", " 8")
    assert "<start_of_turn>" not in raw_tokenizer.decode(sample.token_ids), "no chat template"


def test_a_chat_conversation_prompts_through_the_chat_template(
    raw_tokenizer: PreTrainedTokenizerBase,
) -> None:
    messages = conversation("What is 2 + 3?", "5")
    sample = held_out_prompt(Conversation(messages), raw_tokenizer)
    assert sample.token_ids == prompt_token_ids(raw_tokenizer, messages[:1])
    assert (sample.text, sample.reference) == ("What is 2 + 3?", "5")


def test_only_conversations_with_something_to_prompt_with_become_samples() -> None:
    assert can_prompt(Conversation([{"role": "assistant", "content": "Once upon a time."}], raw=True))
    assert can_prompt(Conversation(conversation("q", "a")))
    # An opening assistant turn (kept by data.train_on_prompt) leaves the chat template nothing to render.
    assert not can_prompt(Conversation([{"role": "assistant", "content": "Hello!"}]))
    assert not can_prompt(Conversation([{"role": "user", "content": "Hi"}]))
