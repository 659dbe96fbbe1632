"""4-bit training stays on the autograd path on every CPU: bitsandbytes' in-place CPU repacking
(AVX512-BF16 CPUs only) is switched off where the model is built, and a guard fails a run that
ever meets a repacked layer.

The tests pretend the CPU has AVX512-BF16 (bitsandbytes reads it when a Linear4bit is built), so a
machine without it catches a regression too.
"""

from __future__ import annotations

from collections.abc import Iterator

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

from qlora_exp.errors import QloraError
from qlora_exp.generation import generate_replies
from qlora_exp.guards import QuantizedWeightGuard
from qlora_exp.model import build_quantized_model, packed_weight_layers, quantized_linears, resolve_source
from qlora_exp.schema import Config, EvalConfig, to_schema
from tests.support import compose_config


@pytest.fixture(scope="module")
def avx512bf16_model() -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """The smoke model built as on an AVX512-BF16 CPU, and a fixed training batch."""
    schema: Config = to_schema(compose_config("experiment=smoke", "lora.dropout=0"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
        torch.manual_seed(0)
        model = build_quantized_model(schema.model, schema.lora)
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(schema.model))
    batch = dict(tokenizer(["What is 2 + 2? 4", "Sort 3, 1, 2. 1, 2, 3"], return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    yield model, batch


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def base_weight_bytes(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in quantized_linears(model) for t in (m.weight.data, m.weight.quant_state.absmax)]


def test_the_repacking_switch_is_forced_off_even_where_bitsandbytes_would_repack(avx512bf16_model) -> None:
    model, batch = avx512bf16_model
    layers = quantized_linears(model)
    assert layers, "the base linear layers should be 4-bit"
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    model.eval()
    with torch.no_grad():  # the exact trigger: eval mode, no grad, CPU input
        model(**batch)
    assert packed_weight_layers(layers) == []


def test_generation_evaluation_and_state_dict_change_nothing(avx512bf16_model) -> None:
    model, batch = avx512bf16_model
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(to_schema(compose_config()).model))
    loss, grads = loss_and_grads(model, batch)
    weights = base_weight_bytes(model)
    # Every adapter learns at step 1: gradients reach the lowest layers through the frozen 4-bit matmuls.
    lora_b = {n: g for n, g in grads.items() if "lora_B" in n}
    assert lora_b and all(bool(g.abs().sum() > 0) for g in lora_b.values()), [
        n for n, g in lora_b.items() if not g.abs().sum() > 0
    ]

    prompt = [[{"role": "user", "content": "2 + 2?"}]]
    generate_replies(model, tokenizer, prompt, EvalConfig(max_new_tokens=2))
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.state_dict()

    loss_after, grads_after = loss_and_grads(model, batch)
    assert torch.equal(loss_after, loss)
    assert grads_after.keys() == grads.keys()
    assert all(torch.equal(grads_after[n], g) for n, g in grads.items())
    assert all(torch.equal(a, b) for a, b in zip(base_weight_bytes(model), weights, strict=True))


def test_the_guard_stops_a_run_that_meets_a_repacked_layer(avx512bf16_model) -> None:
    model, _ = avx512bf16_model
    guard = QuantizedWeightGuard()
    args = TrainingArguments(output_dir="unused", report_to="none")
    state, control = TrainerState(), TrainerControl()
    guard.on_train_begin(args, state, control, model=model)
    assert len(guard.layers) == len(quantized_linears(model))
    guard.on_step_begin(args, state, control)  # nothing repacked: no error
    quant_state = guard.layers[3].weight.quant_state
    quant_state.packing_format_for_cpu = True
    try:
        with pytest.raises(QloraError, match=r"1 of \d+ 4-bit layers were repacked"):
            guard.on_evaluate(args, state, control)
    finally:
        quant_state.packing_format_for_cpu = False
