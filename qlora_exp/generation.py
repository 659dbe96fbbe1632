"""Answers from a model for chat conversations, and exact-match scoring against references.

`generate_replies` serves the run's held-out samples, `qlora-generate` and `qlora-chat` alike:
render with the tokenizer's chat template, generate (greedy unless configured otherwise), stop at
the template's end-of-turn token, decode. `HeldOutSamples` is the Trainer callback that generates
for a fixed seeded set of validation prompts before training, optionally at every evaluation, and
after training (with the in-memory model: no reload), and writes `samples.jsonl`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

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

from qlora_exp.data import DataModule, Message
from qlora_exp.schema import EvalConfig
from qlora_exp.tracking import Tracker

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
# A transformers model, or one wrapped by peft (which forwards generate to it).
GenerativeModel = PreTrainedModel | peft.PeftModel


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
        if attention == "flex_attention":
            base.set_attn_implementation(attention)
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
    generation_config = build_generation_config(cfg, model, tokenizer)
    device = next(model.parameters()).device
    replies: list[str] = []
    with inference_mode(model):
        for start in range(0, len(conversations), cfg.batch_size):
            rendered = [prompt_token_ids(tokenizer, m) for m in conversations[start : start + cfg.batch_size]]
            # Left padding: every row's reply starts at the same position.
            batch = tokenizer.pad({"input_ids": rendered}, padding_side="left", return_tensors="pt").to(
                device
            )
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


def select_conversations(conversations: list[list[Message]], count: int, seed: int) -> list[list[Message]]:
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

    def __init__(self, cfg: EvalConfig, data: DataModule, run_dir: Path, tracker: Tracker) -> None:
        self.cfg = cfg
        self.tokenizer = data.tokenizer
        self.run_dir = run_dir
        self.tracker = tracker
        chosen = select_conversations(data.val_conversations, cfg.num_samples, data.seed)
        pairs = [split_reference(messages) for messages in chosen]
        self.prompts = [prompt for prompt, _ in pairs]
        self.references = [reference for _, reference in pairs]
        self.before: list[str] | None = None
        self.metrics: dict[str, Any] = {}
        self.training = False  # on_evaluate also fires for trainer.evaluate() outside train()

    def _generate(self, model: GenerativeModel, when: str, step: int) -> list[str]:
        generations = generate_replies(model, self.tokenizer, self.prompts, self.cfg)
        rate = exact_match_rate(generations, self.references)
        log.info("exact match %s: %.3f on %d held-out prompts", when, rate, len(self.prompts))
        self.tracker.log({f"samples/exact_match_{when}": rate}, step=step)
        self.tracker.log_table(f"samples/{when}", self._rows(generations), step=step)
        return generations

    def _rows(self, generations: list[str]) -> list[dict[str, Any]]:
        return [
            {
                "prompt": prompt[-1]["content"],
                "reference": reference,
                "generation": generation,
                "exact_match": is_exact_match(generation, reference),
            }
            for prompt, reference, generation in zip(self.prompts, self.references, generations, strict=True)
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
        self.before = self._generate(kwargs["model"], "before", state.global_step)

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
