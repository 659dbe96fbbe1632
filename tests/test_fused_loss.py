"""Text-only training of the multimodal Gemma classes with the fast recipe: the fused head-and-loss
forward (qlora_exp/fused_loss.py) gives the class's own loss and gradients, and with SDPA or flex
attention on the language model (towers eager) flattened examples do not attend to each other."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss

from qlora_exp import attention
from qlora_exp.data.packing import FlatteningCollator
from qlora_exp.fused_loss import fuse_head_and_loss
from qlora_exp.model import resolve_source
from qlora_exp.multimodal import TOWER_ATTN_IMPLEMENTATION
from qlora_exp.schema import to_schema
from tests.support import compose_config, loss_and_gradients, tiny_lora_model

MULTIMODAL = ("tiny-gemma3-mm", "tiny-gemma4-mm")
TEXTS = ("What is 2 + 2? It is 4.", "Sort 3, 1, 2: 1, 2, 3", "Name a colour. Blue is one, red another.")


def examples(name: str) -> list[dict[str, list[int]]]:
    schema = to_schema(compose_config("experiment=smoke", f"model.name_or_path=embedded:{name}"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(schema.model))
    rows = [tokenizer(text)["input_ids"] for text in TEXTS]
    assert len(set(map(len, rows))) > 1
    return [{"input_ids": ids, "labels": [-100] * 2 + ids[2:]} for ids in rows]


class ReferenceLoss:
    """LigerForCausalLMLoss's contract in plain PyTorch: logits from the head's weight, soft-capped,
    then transformers' causal-LM loss (labels shifted). Records the soft-cap it was given."""

    def __init__(self) -> None:
        self.softcaps: list[float | None] = []

    def __call__(
        self,
        hidden_states: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        hidden_size: int,
        final_logit_softcapping: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        assert hidden_states.shape[-1] == hidden_size
        self.softcaps.append(final_logit_softcapping)
        logits = F.linear(hidden_states, lm_head_weight)
        if final_logit_softcapping is not None:
            logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
        return ForCausalLMLoss(logits, labels, vocab_size=lm_head_weight.shape[0], **kwargs)


@pytest.mark.parametrize("name", MULTIMODAL)
def test_fused_head_and_loss_gives_the_class_loss_and_gradients(name: str) -> None:
    model = tiny_lora_model(name)
    base: PreTrainedModel = model.get_base_model()
    batch = FlatteningCollator()(examples(name))
    model.train()
    expected_loss, expected_grads = loss_and_gradients(model, batch)

    reference = ReferenceLoss()
    fuse_head_and_loss(base, ReferenceLoss())
    fuse_head_and_loss(base, reference)  # again (the bench patches each Liger setting): replaces it
    loss, grads = loss_and_gradients(model, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[key], rtol=1e-5, atol=1e-7, msg=key)
    # The head's soft-cap reached the loss (Gemma-4 caps its final logits, Gemma-3 does not).
    assert reference.softcaps == [base.config.get_text_config().final_logit_softcapping]

    # Evaluation needs logits (and generation the cache): the class's forward, unchanged.
    model.eval()
    with torch.no_grad():
        output = model(**batch)
    assert output.logits is not None and reference.softcaps == reference.softcaps[:1]
    torch.testing.assert_close(output.loss, expected_loss, rtol=1e-6, atol=1e-6)


def test_fused_head_and_loss_refuses_a_class_it_does_not_reproduce() -> None:
    base = tiny_lora_model("tiny-gemma3").get_base_model()  # Gemma3ForCausalLM: Liger's own forward serves it
    with pytest.raises(TypeError, match="gemma3_text"):
        fuse_head_and_loss(base, ReferenceLoss())


def separate_loss(model: peft.PeftModel, rows: list[dict[str, list[int]]]) -> float:
    """Each example alone; their losses weighted by their target tokens."""
    total, targets = 0.0, 0
    for row in rows:
        labels = torch.tensor([row["labels"]])
        count = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * count
        targets += count
    return total / targets


def check_attention(model: peft.PeftModel, attention: str) -> None:
    """The language model on `attention`, every tower on eager."""
    config = model.get_base_model().config
    assert config._attn_implementation == config.get_text_config()._attn_implementation == attention
    towers = [getattr(config, key) for key in config.sub_configs if key != "text_config"]
    assert towers and all(tower._attn_implementation == TOWER_ATTN_IMPLEMENTATION for tower in towers)


def test_flex_attention_loads_for_the_language_model_beside_a_tower_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Gemma-4's audio tower has neither SDPA nor flex in transformers 5.24: one string for every tower
    # fails the load. (Flex's packed-sequence mask is the one SDPA's test below checks, and compiling
    # flex on the CPU takes a minute: loading is what differs.) As on a GPU: on the CPU, flex loads
    # as eager (test_attention.py).
    monkeypatch.setattr(attention, "flex_attention_trains_here", lambda: True)
    check_attention(tiny_lora_model("tiny-gemma4-mm", "flex_attention"), "flex_attention")


@pytest.mark.parametrize("name", MULTIMODAL)
def test_sdpa_language_model_keeps_flattened_examples_apart(name: str) -> None:
    model = tiny_lora_model(name, "sdpa")
    check_attention(model, "sdpa")
    rows = examples(name)
    model.eval()
    batch = FlatteningCollator()(rows)
    with torch.no_grad():
        flattened = model(**batch).loss.item()
        assert flattened == pytest.approx(separate_loss(model, rows), rel=1e-5)
        # Control: positions that do not restart at each example make one causal mask over the row
        # (examples see each other), which moves the loss.
        positions = torch.arange(batch["input_ids"].shape[1])[None]
        leaky = model(**{**batch, "position_ids": positions}).loss.item()
    assert leaky != pytest.approx(flattened, rel=1e-4)
