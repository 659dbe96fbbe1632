"""Conversations to token ids and labels: the chat template, prompt masking, the length policy.

Masking is ours rather than TRL's: SFTTrainer's assistant-only loss needs `{% generation %}`
markers that the real Gemma / Llama / Mistral / Qwen templates do not have. We mask by rendering
each conversation prefix with the template itself, which is exact for any template whose
renderings of successive turns are token prefixes of each other; that is checked per example.
Where it fails (Mistral moves the system prompt into the last user turn, Qwen3 strips earlier
turns' reasoning), the assistant turns are located in the full rendering by their text and the
template's end-of-turn marker, through the fast tokenizer's character offsets; an example that
cannot be located either is dropped (counted) instead of being trained with wrong labels.
An assistant turn with `loss_weight` 0 in the data is masked like a prompt turn (also with
`train_on_prompt`), by the same two methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from qlora_exp.data.formats import UNSUPPORTED_LOSS_WEIGHT, Conversation, Drop, Message
from qlora_exp.data.templates import NAMED_TEMPLATES
from qlora_exp.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Drop reasons (the keys of data_stats.json's rows_dropped).
OVER_LENGTH = "over_max_length"
NO_TRAINABLE_TOKENS = "no_trainable_tokens"
TEMPLATE_INCONSISTENT = "template_inconsistent"
TEMPLATE_ERROR = "template_error"
ASSISTANT_FIRST = "assistant_first"

FALLBACK_TEMPLATE = "chatml"


class TemplateMismatch(DataError):
    """The template renders a conversation's prefix differently from the whole: masking would be wrong."""


class AssistantFirst(TemplateError):
    """The conversation opens with an assistant turn: there is no prompt before it to render."""


@dataclass(frozen=True)
class Encoded:
    """Token ids with labels (-100 where no loss), and whether the length policy truncated them."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, setting: str | None) -> str:
    """Set and return the template in use: `setting` (a name or Jinja), the tokenizer's, else chatml."""
    if setting:
        template = NAMED_TEMPLATES.get(setting, setting)
        if template is setting and "{{" not in setting and "{%" not in setting:
            raise DataError(
                f"data.chat_template: {setting!r} is neither a known name nor a Jinja template. "
                f"Fix: use one of {', '.join(NAMED_TEMPLATES)} or a Jinja string"
            )
        tokenizer.chat_template = template
    elif not tokenizer.chat_template:
        log.warning(
            "the tokenizer has no chat template; using the %s fallback (set data.chat_template to choose)",
            FALLBACK_TEMPLATE,
        )
        tokenizer.chat_template = NAMED_TEMPLATES[FALLBACK_TEMPLATE]
    return str(tokenizer.chat_template)


ENCODE_BATCH_SIZE = 256  # conversations whose template renderings are tokenized in one call
Rendered = list[int] | TemplateError  # a rendering's ids, or the template's refusal of that prefix


def relabelled_turns(conversation: Conversation, train_on_prompt: bool) -> list[int] | Drop:
    """The assistant turns labelled unlike the rest of the conversation: the trained ones (loss_weight
    not 0), or with `train_on_prompt`, where everything else is trained, those with loss_weight 0.

    A system or user turn whose loss_weight asks the opposite of `train_on_prompt` is a Drop: prompt
    turns are trained all together or not at all, never one by one.
    """
    weights = conversation.loss_weights or [None] * len(conversation.messages)
    turns = []
    for turn, (message, weight) in enumerate(zip(conversation.messages, weights, strict=True)):
        if message["role"] == "assistant":
            if (weight != 0) != train_on_prompt:
                turns.append(turn)
        elif weight is not None and bool(weight) != train_on_prompt:
            return Drop(
                UNSUPPORTED_LOSS_WEIGHT,
                f"message {turn} ({message['role']}) has loss_weight {weight}, but "
                f"{message['role']} turns are {'all' if train_on_prompt else 'never'} trained with "
                f"data.train_on_prompt={str(train_on_prompt).lower()}. Fix: set "
                f"data.train_on_prompt={str(not train_on_prompt).lower()} or drop loss_weight from "
                "system and user messages",
            )
    return turns


def _template_texts(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], turns: list[int]
) -> list[str | TemplateError]:
    """The renderings masking compares: the whole conversation, then for each of the assistant `turns`
    (see `relabelled_turns`) the prompt before it (with the generation prompt) and the conversation up
    to it. A refused rendering is kept as its error and raised when masking reaches it, as rendering
    turn by turn would."""

    def render(prefix: list[Message], generation_prompt: bool) -> str | TemplateError:
        if not prefix:  # transformers refuses to render an empty conversation
            return AssistantFirst("the conversation opens with an assistant turn")
        try:
            return str(
                tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
            )
        except TemplateError as exc:
            return exc

    whole = render(messages, False)
    texts = [whole]
    if isinstance(whole, TemplateError):
        return texts
    for turn in turns:
        last = turn == len(messages) - 1  # up to the last turn is the whole: not rendered again
        texts += [render(messages[:turn], True), whole if last else render(messages[: turn + 1], False)]
    return texts


def _labelled(rendered: list[Rendered], turns: list[int], train_on_prompt: bool) -> dict[str, list[int]]:
    """Ids of the whole rendering; labels: -100 everywhere (ids everywhere with `train_on_prompt`) except
    on the assistant `turns` (end of turn included), which get the opposite."""

    def ids(index: int) -> list[int]:
        result = rendered[index]
        if isinstance(result, TemplateError):
            raise result
        return result

    input_ids = ids(0)
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(input_ids)
    for index, turn in enumerate(turns):
        prompt, upto = ids(1 + 2 * index), ids(2 + 2 * index)
        if input_ids[: len(upto)] != upto or upto[: len(prompt)] != prompt:
            raise TemplateMismatch(
                f"the chat template renders the conversation up to turn {turn} unlike the whole "
                "(not a token prefix), so prompt masking would be wrong. Fix: set data.chat_template "
                f"to a prefix-consistent template (e.g. {', '.join(NAMED_TEMPLATES)})"
            )
        span = len(upto) - len(prompt)
        labels[len(prompt) : len(upto)] = (
            [IGNORE_INDEX] * span if train_on_prompt else input_ids[len(prompt) : len(upto)]
        )
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _tokenize_templated(
    conversations: list[tuple[list[Message], list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    train_on_prompt: bool,
) -> list[dict[str, list[int]] | TemplateMismatch | TemplateError]:
    """`tokenize_conversation` for many (messages with their `relabelled_turns`), each result or its
    error. Every distinct rendering of the batch is tokenized in one call: the Rust tokenizer encodes a
    batch on all cores, without the per-call overhead that dominated tokenizing each rendering on its
    own (see BENCHMARKS.md, CPU data pipeline)."""
    texts = [_template_texts(tokenizer, messages, turns) for messages, turns in conversations]
    distinct = list(dict.fromkeys(text for group in texts for text in group if isinstance(text, str)))
    # add_special_tokens=False: what apply_chat_template(tokenize=True) passes (the template writes them).
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"] if distinct else []
    ids = dict(zip(distinct, encoded, strict=True))
    results: list[dict[str, list[int]] | TemplateMismatch | TemplateError] = []
    for (_, turns), group in zip(conversations, texts, strict=True):
        rendered = [text if isinstance(text, TemplateError) else list(ids[text]) for text in group]
        try:
            results.append(_labelled(rendered, turns, train_on_prompt))
        except (TemplateMismatch, TemplateError) as exc:
            results.append(exc)
    return results


def tokenize_conversation(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """Ids of the rendered conversation; labels: ids on assistant turns (end of turn included), else -100."""
    turns = relabelled_turns(Conversation(messages), train_on_prompt)
    assert isinstance(turns, list)  # only loss weights, which these messages lack, can make it a Drop
    result = _tokenize_templated([(messages, turns)], tokenizer, train_on_prompt)[0]
    if isinstance(result, Exception):
        raise result
    return result


def tokenize_by_offsets(
    messages: list[Message], turns: list[int], tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool
) -> dict[str, list[int]]:
    """Labels as `_labelled` gives them, with each of the assistant `turns` located by where its text
    (and the end-of-turn marker after it) lies in the full rendering; for templates whose prefixes are
    not token prefixes of the whole."""
    text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    if not tokenizer.is_fast:
        raise TemplateMismatch("locating turns needs a fast tokenizer's offsets; this one is slow")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    suffix = end_of_turn_marker(tokenizer)
    spans: list[tuple[int, int]] = []
    after_prompts: list[int | None] = []
    cursor = 0
    for turn, message in enumerate(messages):
        if message["role"] == "system":  # some templates move it; it is never trained
            continue
        start = text.find(message["content"], cursor)
        if start < 0:
            raise TemplateMismatch(
                f"turn {turn} ({message['role']}) is not found in the rendered conversation, so its "
                "tokens cannot be told apart. Fix: set data.chat_template (e.g. chatml)"
            )
        previous_end, cursor = cursor, start + len(message["content"])
        if message["role"] == "assistant":
            if suffix and text.startswith(suffix, cursor):
                cursor += len(suffix)
            if turn in turns:
                spans.append((start, cursor))
                prompt = _prompt_text(tokenizer, messages[:turn])
                fits = prompt is not None and text.startswith(prompt) and previous_end <= len(prompt) <= start
                after_prompts.append(len(prompt) if fits and prompt is not None else None)
    starts = [after for after in after_prompts if after is not None]
    if len(starts) == len(spans):
        # Every answer follows its generation prompt in the text: what the template puts between the
        # two (Qwen3's empty <think> block on the last answers) is what the model generates, so it is
        # trained with the answer, as the prefix method trains it on conversations it can handle.
        spans = [(after, end) for after, (_, end) in zip(starts, spans, strict=True)]
    labels = [
        token
        if any(begin < end_span and end > start_span for start_span, end_span in spans) != train_on_prompt
        else IGNORE_INDEX
        for token, (begin, end) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _prompt_text(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str | None:
    """`messages` rendered with the generation prompt; None where the template refuses them."""
    if not messages:
        return None
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except TemplateError:
        return None


def end_of_turn_marker(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes right after an assistant's text (e.g. `<|im_end|>\\n`, `</s>`), found by
    rendering a probe conversation: the text after the probe answer, which needs no generation prompt
    (Gemma-4 26B/31B's prompt adds an empty thought channel that the rendered answer lacks). Empty
    when the template does not show the answer once."""
    probe = "probe-answer-5e1f"
    conversation: list[Message] = [
        {"role": "user", "content": "probe-question"},
        {"role": "assistant", "content": probe},
    ]
    try:
        whole = str(tokenizer.apply_chat_template(conversation, tokenize=False))
    except TemplateError:
        return ""
    if whole.count(probe) != 1:
        return ""
    return whole.split(probe, 1)[1]


def tokenize_raw(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """Contents tokenized as they are (no template), BOS as the tokenizer adds it, EOS at the end;
    labels on assistant parts and the EOS (on everything with `train_on_prompt`)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for message, ids in zip(messages, raw_turn_ids(messages, tokenizer), strict=True):
        trained = train_on_prompt or message["role"] == "assistant"
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    if eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        labels.append(eos)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def raw_turn_ids(messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each turn of a raw conversation as `tokenize_raw` trains it: the text as it is, with the special
    tokens the tokenizer adds (BOS) on the first turn only. Generation prompts with the same ids."""
    return [
        list(tokenizer(message["content"], add_special_tokens=index == 0)["input_ids"])
        for index, message in enumerate(messages)
    ]


def split_raw_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """A text row's ids as `tokenize_raw` starts them, cut after the first half of its text tokens (at
    least one, and moved on to the end of a character): the head, with the special tokens the
    tokenizer puts in front (BOS), for the model to continue, and the text tokens after it, the
    continuation it was trained on."""
    encoded = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    ids, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
    positions = [index for index, flag in enumerate(special) if not flag]
    if not positions:  # nothing but special tokens: nothing to continue
        return ids, []

    def inside_a_character(count: int) -> bool:
        # Byte-level tokenizers split a CJK character over tokens; a cut between them would show as
        # U+FFFD at the end of the prompt and the start of the reference.
        return tokenizer.batch_decode([ids[: positions[count - 1] + 1]])[0].endswith("\ufffd")

    count = max(1, len(positions) // 2)
    while count < len(positions) and inside_a_character(count):
        count += 1
    cut = positions[count - 1] + 1
    return ids[:cut], [token for token, flag in zip(ids[cut:], special[cut:], strict=True) if not flag]


@lru_cache(maxsize=8)
def _warn_locating_turns(template: str) -> None:
    log.warning(
        "the chat template does not render conversation prefixes as token prefixes (template %s...); "
        "masking by locating each assistant turn in the rendered text instead",
        template[:40].replace("\n", " "),
    )


def encode_conversations(
    conversations: list[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overlength: str,
    train_on_prompt: bool,
) -> list[Encoded | Drop]:
    """Tokenize, mask and apply the length policy to each conversation (an `Encoded`, or why not),
    tokenizing the template renderings of `ENCODE_BATCH_SIZE` conversations at a time."""
    results: list[Encoded | Drop] = []
    for start in range(0, len(conversations), ENCODE_BATCH_SIZE):
        batch = conversations[start : start + ENCODE_BATCH_SIZE]
        # Raw conversations have no template turns (and no loss weights: they come from plain strings).
        plans = [[] if c.raw else relabelled_turns(c, train_on_prompt) for c in batch]
        templated = iter(
            _tokenize_templated(
                [
                    (c.messages, turns)
                    for c, turns in zip(batch, plans, strict=True)
                    if not c.raw and isinstance(turns, list)
                ],
                tokenizer,
                train_on_prompt,
            )
        )
        for conversation, turns in zip(batch, plans, strict=True):
            if isinstance(turns, Drop):
                results.append(turns)
                continue
            tokenized = (
                tokenize_raw(conversation.messages, tokenizer, train_on_prompt)
                if conversation.raw
                else next(templated)
            )
            results.append(
                _encoded_or_drop(
                    conversation,
                    turns,
                    tokenized,
                    tokenizer,
                    max_length=max_length,
                    overlength=overlength,
                    train_on_prompt=train_on_prompt,
                )
            )
    return results


def encode_conversation(
    conversation: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overlength: str,
    train_on_prompt: bool,
) -> Encoded | Drop:
    """Tokenize, mask and apply the length policy (truncate, or an over_max_length Drop)."""
    return encode_conversations([conversation], tokenizer, max_length, overlength, train_on_prompt)[0]


def _encoded_or_drop(
    conversation: Conversation,
    turns: list[int],
    tokenized: dict[str, list[int]] | TemplateMismatch | TemplateError,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    overlength: str,
    train_on_prompt: bool,
) -> Encoded | Drop:
    """The masked ids (turns located by offsets where the template is not prefix-consistent), cut or
    dropped by the length policy; a Drop for what the template refuses or what cannot be masked."""
    try:
        if isinstance(tokenized, TemplateMismatch):
            _warn_locating_turns(str(tokenizer.chat_template))
            tokenized = tokenize_by_offsets(conversation.messages, turns, tokenizer, train_on_prompt)
        elif isinstance(tokenized, TemplateError):
            raise tokenized
    except TemplateMismatch as exc:
        return Drop(TEMPLATE_INCONSISTENT, str(exc))
    except AssistantFirst as exc:
        return Drop(
            ASSISTANT_FIRST,
            f"{exc}, so no prompt precedes it. Fix: remove that opening turn or make it a system turn "
            "in the data, or set data.train_on_prompt=true to train on the whole conversation",
        )
    except TemplateError as exc:  # the template's own checks (e.g. roles must alternate)
        return Drop(
            TEMPLATE_ERROR,
            f"the chat template refused the conversation: {exc}. Fix: set data.chat_template to "
            "a template that accepts it (gemma folds a system turn into the first user turn)",
        )
    input_ids, labels = tokenized["input_ids"], tokenized["labels"]
    truncated = len(input_ids) > max_length
    if truncated:
        if overlength != "truncate":  # the DataModule raises for `error`, naming the row
            return Drop(OVER_LENGTH, f"{len(input_ids)} tokens > data.max_length={max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is never a target (shifted away)
        return Drop(
            NO_TRAINABLE_TOKENS,
            "no assistant tokens to train on" + (" after truncation" if truncated else ""),
        )
    return Encoded(input_ids, labels, truncated)
