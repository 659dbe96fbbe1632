"""The training loop's own parts: the token count kept on the device (training.DeviceTokenCountMixin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from qlora_exp.training import DeviceTokenCountMixin


class CountingTrainer(DeviceTokenCountMixin, Trainer):
    """The mixin on a plain Trainer."""


def _batches(pad: int) -> list[dict[str, torch.Tensor]]:
    """A padded batch (attention_mask) and a padding-free one (no mask; pads only as separators)."""
    ids = torch.tensor([[5, 6, 7, pad], [8, 9, pad, pad]])
    return [
        {"input_ids": ids, "attention_mask": (ids != pad).long()},
        {
            "input_ids": torch.tensor([[5, 6, 7, 8, 9, pad, 4]]),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 0]]),
        },
    ]


def test_token_count_is_the_trainers_and_is_read_back_only_when_logged(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, include_num_input_tokens_seen="non_padding"
    )
    model = torch.nn.Linear(2, 2)
    ours = CountingTrainer(model=model, args=args, processing_class=tiny_tokenizer)
    theirs = Trainer(model=model, args=args, processing_class=tiny_tokenizer)
    batches = _batches(tiny_tokenizer.pad_token_id)
    for batch in batches:
        theirs._track_num_input_tokens(batch)
    assert theirs.state.num_input_tokens_seen == 5 + 6

    reads: list[torch.Tensor] = []
    item = torch.Tensor.item

    def counted_item(tensor: torch.Tensor) -> Any:
        reads.append(tensor)
        return item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    for batch in batches * 2:
        ours._track_num_input_tokens(batch)
    assert not reads and ours.state.num_input_tokens_seen == 0  # nothing read back per micro-batch
    ours.log({"loss": 1.0})
    assert len(reads) == 1
    assert ours.state.num_input_tokens_seen == 2 * theirs.state.num_input_tokens_seen
    assert ours.state.log_history[-1]["num_input_tokens_seen"] == 22  # the log has the settled count
