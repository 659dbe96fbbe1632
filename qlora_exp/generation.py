"""Answers from a model for chat conversations, and exact-match scoring against references.

`generate_replies` serves `qlora-generate` and `qlora-chat`: render with the tokenizer's chat
template, generate (greedy unless configured otherwise), stop at the template's end-of-turn token,
decode. `HeldOutSamples` is the Trainer callback that generates for a fixed seeded set of validation
prompts before training, optionally at every evaluation, and after training (with the in-memory
model: no reload), and writes `samples.jsonl`. Its prompts are what training saw before the reply:
rendered with the chat template for conversations, tokenized as they are for raw data (plain text,
string prompt/completion pairs), which the model learnt to continue without a template.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import peft
import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.generation.streamers import BaseStreamer

from qlora_exp.baseline import GENERATIONS, BaselineCache
from qlora_exp.data.formats import Conversation, Message
from qlora_exp.data.module import DataModule
from qlora_exp.data.tokenization import raw_turn_ids, split_raw_text
from qlora_exp.multimodal import attention_implementations
from qlora_exp.rng import isolated_rng
from qlora_exp.run.directory import SAMPLES_FILE
from qlora_exp.schema import EvalConfig
from qlora_exp.tracking import Tracker

log = logging.getLogger(__name__)

# A transformers model, or one wrapped by peft (which forwards generate to it).
GenerativeModel = PreTrainedModel | peft.PeftModel
T = TypeVar("T")


def stop_token_ids(model: GenerativeModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a reply: the model's generation_config EOS ids (chat models list their
    end-of-turn token there, e.g. Gemma's `<end_of_turn>`) plus the tokenizer's EOS."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return sorted(set(ids))


def build_generation_config(
    cfg: EvalConfig, model: GenerativeModel, tokenizer: PreTrainedTokenizerBase
) -> GenerationConfig:
    """Decoding settings from `EvalConfig`; greedy unless `do_sample`."""
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else {}
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        # Training disables the KV cache (gradient checkpointing); generation wants it back.
        use_cache=True,
        **sampling,
    )


@contextmanager
def inference_mode(model: GenerativeModel) -> Iterator[None]:
    """Eval mode without gradients and eager attention instead of flex, restoring both afterwards
    (the Trainer's model is reused).

    Compiled flex attention would compile again for the no-grad mode and for the decode shapes,
    and torch.compile's recompile limit is per function: on an H200, a run's first generation
    spent 104 s compiling and left the next training step to fail in uncompiled flex attention
    (BENCHMARKS.md). Eager attention keeps Gemma-2's softcap and is cheap at prompt lengths.
    """
    # peft types its base model as nn.Module; it is the transformers model it wraps.
    base = cast(PreTrainedModel, model.get_base_model()) if isinstance(model, peft.PeftModel) else model
    attention = base.config._attn_implementation
    was_training = model.training
    model.eval()
    if attention == "flex_attention":
        base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            yield
    finally:
        if attention == "flex_attention":  # the language model's; a multimodal model's towers stay eager
            base.set_attn_implementation(attention_implementations(base.config, attention))
        model.train(was_training)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """`messages` rendered with the chat template and tokenized, ending where the model's turn starts."""
    encoded: Any = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])


def generate_replies(
    model: GenerativeModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    cfg: EvalConfig,
    streamer: BaseStreamer | None = None,
) -> list[str]:
    """The model's next assistant turn for each conversation (each ends with a user turn)."""
    prompts = [prompt_token_ids(tokenizer, messages) for messages in conversations]
    return generate_continuations(model, tokenizer, prompts, cfg, streamer)


def generate_continuations(
    model: GenerativeModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: EvalConfig,
    streamer: BaseStreamer | None = None,
) -> list[str]:
    """What the model writes after each prompt (token ids), decoded without special tokens and
    stripped; `cfg.batch_size` prompts at a time."""
    generation_config = build_generation_config(cfg, model, tokenizer)
    device = next(model.parameters()).device
    replies: list[str] = []
    with inference_mode(model):
        for start in range(0, len(prompts), cfg.batch_size):
            # Left padding: every row's reply starts at the same position.
            batch = tokenizer.pad(
                {"input_ids": prompts[start : start + cfg.batch_size]},
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            # mypy takes peft's forwarded `generate` for nn.Module.__getattr__'s Tensor, hence the ignore.
            output = model.generate(**batch, generation_config=generation_config, streamer=streamer)  # type: ignore[operator]
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            replies.extend(
                text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
    return replies


def is_exact_match(generation: str, reference: str) -> bool:
    """Equal after trimming surrounding whitespace (case and inner spacing matter)."""
    return generation.strip() == reference.strip()


def exact_match_rate(generations: list[str], references: list[str]) -> float:
    """Share of generations equal to their reference."""
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
    if not references:
        return 0.0
    return sum(map(is_exact_match, generations, references)) / len(references)


def split_reference(messages: list[Message]) -> tuple[list[Message], str]:
    """A conversation without its last assistant turn, and that turn's text (the reference)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("conversation has no assistant turn to use as reference")
    return messages[:last], messages[last]["content"]


@dataclass(frozen=True)
class HeldOutPrompt:
    """One held-out sample: the model's input as token ids and as text (for samples.jsonl), and the
    reference it should write."""

    text: str
    token_ids: list[int]
    reference: str


def held_out_prompt(conversation: Conversation, tokenizer: PreTrainedTokenizerBase) -> HeldOutPrompt:
    """The conversation before its last assistant turn as the model's input, that turn as the reference.

    A chat conversation is rendered with the chat template up to where the model's turn starts (the
    text shown is its last prompt turn). A raw one is tokenized as training tokenized it, without a
    template (`raw_turn_ids`): a string prompt/completion pair prompts with the prompt's ids; a text
    row, which has no prompt, gives the first half of its tokens (at least one) to continue and the
    rest as the reference.
    """
    prompt, reference = split_reference(conversation.messages)
    if not conversation.raw:
        return HeldOutPrompt(prompt[-1]["content"], prompt_token_ids(tokenizer, prompt), reference)
    if prompt:
        ids = [token for turn in raw_turn_ids(prompt, tokenizer) for token in turn]
        return HeldOutPrompt(prompt[-1]["content"], ids, reference)
    head, rest = split_raw_text(reference, tokenizer)
    # Both decoded as the generation is, so that exact match compares like with like.
    text, continuation = tokenizer.batch_decode([head, rest], skip_special_tokens=True)
    return HeldOutPrompt(text, head, continuation)


def can_prompt(conversation: Conversation) -> bool:
    """Whether a held-out sample can be made of it: it has an assistant turn, and, unless raw (a text
    row continues its own first half), a turn before the last one (a chat template cannot render an
    empty conversation; `data.train_on_prompt` keeps conversations that open with the assistant)."""
    roles = [message["role"] for message in conversation.messages]
    if "assistant" not in roles:
        return False
    last = len(roles) - 1 - roles[::-1].index("assistant")
    return conversation.raw or last > 0


def select_conversations(conversations: Sequence[T], count: int, seed: int) -> list[T]:
    """A seeded subset of `count` conversations, in their original order (all when fewer)."""
    if count >= len(conversations):
        return list(conversations)
    chosen = sorted(random.Random(seed).sample(range(len(conversations)), count))
    return [conversations[i] for i in chosen]


class HeldOutSamples(TrainerCallback):
    """Generations for a fixed, seeded set of held-out prompts, before and after training.

    After training it writes `samples.jsonl` (prompt, reference, generation, generation_before,
    exact_match) and logs W&B tables; `metrics` then holds exact_match_before and exact_match.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        data: DataModule,
        run_dir: Path,
        tracker: Tracker,
        baseline: BaselineCache | None = None,
    ) -> None:
        self.cfg = cfg
        # The generations before training, shared by a sweep's jobs (qlora_exp/baseline.py); not when
        # sampling: the random state then depends on the adapter's initialisation, i.e. on its rank.
        self.baseline = None if cfg.do_sample else baseline
        self.tokenizer = data.tokenizer
        self.run_dir = run_dir
        self.tracker = tracker
        usable = [conversation for conversation in data.val_conversations if can_prompt(conversation)]
        chosen = select_conversations(usable, cfg.num_samples, data.seed)
        self.prompts = [held_out_prompt(conversation, data.tokenizer) for conversation in chosen]
        self.references = [prompt.reference for prompt in self.prompts]
        self.before: list[str] | None = None
        self.metrics: dict[str, Any] = {}
        self.training = False  # on_evaluate also fires for trainer.evaluate() outside train()

    def _generate(self, model: GenerativeModel, when: str, step: int) -> list[str]:
        token_ids = [prompt.token_ids for prompt in self.prompts]
        generations = generate_continuations(model, self.tokenizer, token_ids, self.cfg)
        self._report(generations, when, step)
        return generations

    def _generate_before(self, model: GenerativeModel, step: int) -> list[str]:
        """The untrained model's generations: from the baseline cache when an earlier job stored them."""
        with isolated_rng():  # training draws the same random numbers, cached or not
            cached = self.baseline.load(GENERATIONS) if self.baseline else None
            if cached is None:
                token_ids = [prompt.token_ids for prompt in self.prompts]
                cached = generate_continuations(model, self.tokenizer, token_ids, self.cfg)
                if self.baseline:
                    self.baseline.save(GENERATIONS, cached)
        self._report(cached, "before", step)
        return list(cached)

    def _report(self, generations: list[str], when: str, step: int) -> None:
        rate = exact_match_rate(generations, self.references)
        log.info("exact match %s: %.3f on %d held-out prompts", when, rate, len(self.prompts))
        self.tracker.log({f"samples/exact_match_{when}": rate}, step=step)
        self.tracker.log_table(f"samples/{when}", self._rows(generations), step=step)

    def _rows(self, generations: list[str]) -> list[dict[str, Any]]:
        return [
            {
                "prompt": prompt.text,
                "reference": prompt.reference,
                "generation": generation,
                "exact_match": is_exact_match(generation, prompt.reference),
            }
            for prompt, generation in zip(self.prompts, generations, strict=True)
        ]

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.training = True
        if not self.prompts:
            return
        if state.global_step > 0:  # resumed from a checkpoint: the untrained model is gone
            log.info("resumed at step %d: no exact_match_before", state.global_step)
            return
        self.before = self._generate_before(kwargs["model"], state.global_step)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Step 0 (eval_on_start) and the last step are covered by on_train_begin / on_train_end.
        if (
            self.training
            and self.prompts
            and self.cfg.samples_every_eval
            and 0 < state.global_step < state.max_steps
        ):
            self._generate(kwargs["model"], "during", state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.training = False
        if not self.prompts:
            return
        generations = self._generate(kwargs["model"], "after", state.global_step)
        rows = self._rows(generations)
        if self.before is not None:
            for row, before in zip(rows, self.before, strict=True):
                row["generation_before"] = before
            self.metrics["exact_match_before"] = exact_match_rate(self.before, self.references)
        self.metrics["exact_match"] = exact_match_rate(generations, self.references)
        self.metrics["exact_match_samples"] = len(rows)
        if not state.is_world_process_zero:  # every rank generates the same; one writes
            return
        with (self.run_dir / SAMPLES_FILE).open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        log.info("wrote %d samples to %s", len(rows), self.run_dir / SAMPLES_FILE)
