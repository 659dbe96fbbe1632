"""The quantized-model factory: 4-bit NF4 base, frozen; LoRA adapters train."""

from __future__ import annotations

from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoTokenizer

from qlora_exp.errors import ConfigError
from qlora_exp.model import (
    attach_lora,
    build_lora_config,
    build_quantization_config,
    build_quantized_model,
    load_trainable_base,
    resolve_attention,
    resolve_source,
)
from qlora_exp.precision import keep_fp32_residual
from qlora_exp.schema import Config


def test_quantization_config_follows_the_schema(smoke_schema: Config) -> None:
    smoke_schema.model.bnb_4bit_compute_dtype = "bfloat16"
    smoke_schema.model.bnb_4bit_use_double_quant = False
    config = build_quantization_config(smoke_schema.model)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_use_double_quant is False


def test_lora_config_follows_the_schema(smoke_schema: Config) -> None:
    smoke_schema.lora.r, smoke_schema.lora.alpha, smoke_schema.lora.dropout = 4, 8, 0.1
    config = build_lora_config(smoke_schema.lora)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert config.target_modules == "all-linear"
    smoke_schema.lora.target_modules = ["q_proj", "v_proj"]
    assert set(build_lora_config(smoke_schema.lora).target_modules) == {"q_proj", "v_proj"}


def test_sdpa_is_refused_for_gemma2_before_weights_load(smoke_schema: Config) -> None:
    smoke_schema.model.attn_implementation = "sdpa"
    with pytest.raises(ConfigError, match="soft-capping"):
        resolve_attention(smoke_schema.model, resolve_source(smoke_schema.model))


def test_adapter_weights_change_while_quantized_base_stays_frozen(smoke_schema: Config) -> None:
    torch.manual_seed(0)
    model = build_quantized_model(smoke_schema.model, smoke_schema.lora)
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(smoke_schema.model))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "base linear layers should be 4-bit"
    assert all(m.weight.quant_type == "nf4" for m in four_bit)
    base_before = {id(m): m.weight.data.clone() for m in four_bit}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    lora_before = {n: p.detach().clone() for n, p in lora.items()}

    batch = tokenizer(["What is 2 + 2? 4", "Sort 3, 1, 2. 1, 2, 3"], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert any(not torch.equal(lora_before[n], p) for n, p in lora.items())
    assert all(torch.equal(base_before[id(m)], m.weight.data) for m in four_bit)


def test_fp32_residual_keeps_the_sums_fp32_and_the_blocks_in_the_compute_dtype(smoke_schema: Config) -> None:
    cfg = replace(
        smoke_schema.model,
        bnb_4bit_compute_dtype="bfloat16",
        upcast_unquantized_params=False,
        fp32_residual=True,
    )
    base = load_trainable_base(cfg)
    layer = base.model.layers[0]
    seen: dict[str, torch.dtype] = {}
    layer.register_forward_hook(
        lambda m, i, o: seen.update(residual=(o[0] if isinstance(o, tuple) else o).dtype)
    )
    layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.update(attention=o.dtype))
    layer.mlp.up_proj.register_forward_hook(lambda m, i, o: seen.update(mlp=o.dtype))
    layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.update(attention_out=o.dtype))
    layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.update(mlp_out=o.dtype))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = base(input_ids=ids, labels=ids)
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16  # no fp32 copy of the embeddings
    assert seen == {
        "attention": torch.bfloat16,
        "mlp": torch.bfloat16,
        "attention_out": torch.float32,  # the projections that write into the residual
        "mlp_out": torch.float32,
        "residual": torch.float32,
    }
    assert out.logits.dtype == torch.bfloat16  # the LM head runs in the compute dtype

    # peft's way (every unquantized parameter in fp32) gives the same loss up to bf16 rounding.
    upcast = load_trainable_base(replace(cfg, upcast_unquantized_params=True))
    assert upcast.get_input_embeddings().weight.dtype == torch.float32
    with torch.no_grad():
        upcast_loss = upcast(input_ids=ids, labels=ids).loss
    assert abs(upcast_loss.item() - out.loss.item()) < 0.01 * upcast_loss.item()


def test_fp32_residual_hooks_come_off_and_bf16_is_bf16_throughout(smoke_schema: Config) -> None:
    cfg = replace(smoke_schema.model, bnb_4bit_compute_dtype="bfloat16", upcast_unquantized_params=False)
    base = load_trainable_base(cfg)
    seen: dict[str, torch.dtype] = {}
    base.model.layers[0].register_forward_hook(lambda m, i, o: seen.update(residual=o.dtype))
    ids = torch.arange(1, 9).unsqueeze(0)
    hooks = keep_fp32_residual(base, torch.bfloat16)
    with torch.no_grad():
        base(input_ids=ids)
    assert seen["residual"] == torch.float32
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        base(input_ids=ids)
    assert seen["residual"] == torch.bfloat16


class _NoLayers(torch.nn.Module):
    """A causal-LM stand-in whose decoder has no per-layer norms to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(4, 2)

    def get_decoder(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed


def test_fp32_residual_refuses_an_architecture_it_cannot_hook() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.fp32_residual: Identity has no `layers` module.*Fix: model.fp32_residual=false",
    ):
        keep_fp32_residual(_NoLayers(), torch.bfloat16)  # type: ignore[arg-type]


@pytest.mark.parametrize("fp32_residual", [True, False])
def test_a_tiny_lora_update_survives_only_in_the_fp32_residual(
    smoke_schema: Config, fp32_residual: bool
) -> None:
    """Why the switch exists: LoRA's B starts at zero, so its first outputs sit far below bf16's
    resolution. Added to a bf16 projection output they round away; added to the fp32 output of a
    residual-writing projection (o_proj, down_proj) they reach the residual stream."""
    cfg = replace(
        smoke_schema.model,
        bnb_4bit_compute_dtype="bfloat16",
        upcast_unquantized_params=False,
        fp32_residual=fp32_residual,
        gradient_checkpointing=False,
    )
    model = attach_lora(load_trainable_base(cfg), replace(smoke_schema.lora, dropout=0.0)).eval()
    writers = [
        m for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj")) and hasattr(m, "lora_B")
    ]
    seen: list[list[torch.Tensor]] = [[] for _ in writers]
    for outputs, writer in zip(seen, writers, strict=True):
        writer.register_forward_hook(lambda m, i, o, outputs=outputs: outputs.append(o.float()))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)  # B = 0: the base model
        for writer in writers:
            writer.lora_B["default"].weight.fill_(1e-7)  # outputs ~1e-6 of the base's: below bf16's 2^-9
        model(input_ids=ids)
    changed = torch.cat([(after != before).flatten() for before, after in seen]).float().mean().item()
    if fp32_residual:
        assert changed > 0.9, changed  # (a few outputs are exactly equal by chance)
    else:
        assert changed < 0.01, changed  # a rare output near zero can still round the other way
