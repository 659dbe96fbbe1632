"""MoE QLoRA: fused experts in 4 bits with exact grouped forward/backward, LoRA on them, refusals."""

from __future__ import annotations

import itertools
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    PreTrainedModel,
)

from qlora_exp.cli.merge import merge_run
from qlora_exp.embedded import resolve_embedded
from qlora_exp.embedded.families import TINY_GEMMA4_TOWERS
from qlora_exp.errors import ConfigError
from qlora_exp.generation import generate_replies
from qlora_exp.model import (
    attach_lora,
    attach_saved_adapter,
    build_lora_config,
    load_quantized_base,
    load_trainable_base,
)
from qlora_exp.moe.experts import (
    GroupedExperts,
    dequantize_experts,
    expert_weight_names,
    grouped_mm,
    liger_kernel_config,
)
from qlora_exp.moe.loading import find_fused_experts
from qlora_exp.moe.lora import count_trainable_by_kind, target_lora
from qlora_exp.run.finished import FinishedRun
from qlora_exp.schema import LoraConfig, ModelConfig
from tests.support import TINY_RUN, train_in_process

TINY_MOE = "embedded:tiny-qwen3-moe"  # Qwen3-MoE: 2 layers, 4 experts of width 32, 2 active, hidden 64


def moe_config(**changes: object) -> ModelConfig:
    return ModelConfig(name_or_path=TINY_MOE, **changes)  # type: ignore[arg-type]


def experts_modules(model: nn.Module) -> list[nn.Module]:
    return list(find_fused_experts(model).supported.values())


def to_dequantized_reference(model: PreTrainedModel) -> PreTrainedModel:
    """The same model with each expert weight quantized-then-dequantized to fp32, computed by
    transformers' own eager per-expert loop (in place)."""
    for module in experts_modules(model):
        assert isinstance(module, GroupedExperts)
        for name in expert_weight_names(module):
            plain = dequantize_experts(getattr(module, name), None, torch.float32)
            setattr(module, name, nn.Parameter(plain, requires_grad=False))
        module.__class__ = module.source_cls
    model.set_experts_implementation("eager")
    return model


def test_experts_dequantize_as_bitsandbytes_does_whole_or_per_expert() -> None:
    torch.manual_seed(0)
    for shape in [(4, 64, 32), (3, 24, 12)]:  # 24x12 = 288 values: experts straddle 64-value blocks
        weight = bnb.nn.Params4bit(
            torch.randn(shape), requires_grad=False, compress_statistics=True, quant_type="nf4"
        ).to("cpu")
        whole = dequantize_experts(weight, None, torch.float32)
        torch.testing.assert_close(
            whole, bnbf.dequantize_4bit(weight.data, weight.quant_state), rtol=0, atol=0
        )
        picked = torch.tensor([2, 0, 2])
        torch.testing.assert_close(
            dequantize_experts(weight, picked, torch.float32), whole[picked], rtol=0, atol=0
        )


def test_grouped_matmul_equals_one_matmul_per_expert_on_both_paths() -> None:
    torch.manual_seed(0)
    offsets = torch.tensor([3, 3, 9, 12], dtype=torch.int32)  # an empty group included
    for k, n in [(16, 8), (16, 2)]:  # n=2 in fp32 (8-byte rows) is too narrow for torch's kernel
        x, weight = torch.randn(12, k), torch.randn(4, k, n)
        bounds = [0, *offsets.tolist()]
        expected = torch.cat([x[a:b] @ weight[e] for e, (a, b) in enumerate(itertools.pairwise(bounds))])
        torch.testing.assert_close(grouped_mm(x, weight, offsets), expected)


def tiny_gemma4_moe() -> PreTrainedModel:
    """Gemma-4 26B-A4B-style: the multimodal class (a tiny vision tower beside the decoder), a dense
    MLP and experts in every layer, the router a `router.proj` Linear."""
    text = Gemma4TextConfig(
        vocab_size=128,
        vocab_size_per_layer_input=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
    )
    # The embedded tiny Gemma-4's vision tower (its audio tower is left out: 26B-A4B has none).
    vision = TINY_GEMMA4_TOWERS["vision_config"]
    return Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision))


def tiny_gpt_oss() -> PreTrainedModel:
    """GPT-OSS: experts stored transposed, with biases, gate and up interleaved, clamped gating."""
    config = GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = GptOssForCausalLM(config)
    for name, param in model.named_parameters():
        if name.endswith("_bias"):  # transformers initialises them to zero: make them count
            nn.init.normal_(param, std=0.1)
    return model


@pytest.fixture(scope="module", params=["qwen3_moe", "gemma4_mm", "gpt_oss"])
def moe_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE checkpoint of each fused-experts layout: Qwen3-MoE (the embedded one), Gemma-4
    (multimodal, as 26B-A4B ships), GPT-OSS."""
    if request.param == "qwen3_moe":
        return resolve_embedded(TINY_MOE)
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    (tiny_gemma4_moe() if request.param == "gemma4_mm" else tiny_gpt_oss()).save_pretrained(path)
    return path


def test_4bit_experts_give_the_logits_of_their_dequantized_weights(moe_checkpoint: Path) -> None:
    model = load_quantized_base(ModelConfig(name_or_path=str(moe_checkpoint)))
    layout = find_fused_experts(model)
    assert len(layout.supported) == 2 and not layout.unsupported
    for module in layout.supported.values():  # every expert weight is 4-bit
        for name in expert_weight_names(module):
            weight = getattr(module, name)
            assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8
            assert weight.quant_state.shape[0] == 4
    # The routers stay out of 4 bits (Gemma-4's is a Linear, which bitsandbytes would convert).
    routers = [m for n, m in model.named_modules() if n.endswith((".gate", ".router", ".router.proj"))]
    assert routers and not any(isinstance(m, bnb.nn.Linear4bit) for m in routers)
    torch.manual_seed(0)
    prefill = torch.randint(0, 128, (2, 24))  # 96 token-expert pairs: the grouped path
    decode = prefill[:1, :1]  # 2 pairs, fewer than the 4 experts: each pair's expert alone
    with torch.no_grad():
        ours = [model(input_ids=ids).logits for ids in (prefill, decode)]
        to_dequantized_reference(model)
        reference = [model(input_ids=ids).logits for ids in (prefill, decode)]
        original = AutoModelForCausalLM.from_pretrained(moe_checkpoint)(input_ids=prefill).logits
    for got, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The 4-bit model differs from the unquantized checkpoint by far more: the experts really are 4-bit
    # (its attention too, so the difference is not the experts' alone).
    assert (ours[0] - original).abs().max() > 1e-3


ROUTER_NAMES = (".gate", ".router", ".router.proj")  # Qwen3-MoE, GPT-OSS, Gemma-4


def test_default_lora_trains_experts_and_attention_never_the_router(moe_checkpoint: Path) -> None:
    model = attach_lora(load_trainable_base(ModelConfig(name_or_path=str(moe_checkpoint))), LoraConfig())
    counts = count_trainable_by_kind(model)
    assert counts["experts"] > 0 and counts["attention"] > 0
    routers = [m for n, m in model.named_modules() if n.endswith(ROUTER_NAMES)]
    assert routers and not any("lora_" in n for m in routers for n, _ in m.named_parameters())
    assert not any("lora_" in n for n, _ in model.named_parameters() if "vision_tower" in n)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    expert_b = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert expert_b and all(p.grad is not None and p.grad.abs().max() > 0 for p in expert_b)


def test_expert_lora_matches_peft_param_wrapper_on_dequantized_experts(embedded_cache: Path) -> None:
    """Factored LoRA on the 4-bit experts = peft's own ParamWrapper (W + B A) on the same experts
    dequantized: logits and every LoRA gradient. So the backward reaches the inputs through the
    frozen 4-bit weights, and the adapter means the same to plain peft (qlora-merge relies on it)."""
    lora_cfg = LoraConfig(dropout=0.0, target_modules=["attention+experts"])
    torch.manual_seed(0)
    ours = attach_lora(load_quantized_base(moe_config()), lora_cfg)
    for name, param in ours.named_parameters():
        if "lora_B" in name:  # B starts at zero; give it values so that A gets gradients too
            nn.init.normal_(param, std=0.1)
    reference = attach_lora(to_dequantized_reference(load_quantized_base(moe_config())), lora_cfg)
    assert type(reference.base_model.model.model.layers[0].mlp.experts).__module__.startswith("peft.")
    lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert not reference.load_state_dict(lora, strict=False).unexpected_keys
    ids = torch.randint(0, 1000, (2, 24))
    results = []
    for model in (ours, reference):
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    (logits, grads), (ref_logits, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("experts" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6)


def test_target_presets_and_trainable_counts_per_kind(embedded_cache: Path) -> None:
    base = load_trainable_base(moe_config())
    # Liger's fused-MoE patch would replace the 4-bit experts' forward: it stays off for them.
    assert liger_kernel_config(base) == {"swiglu": False}
    targets = {}
    for entry in ("attention", "experts", "attention+experts", "all-linear", "all"):
        config = build_lora_config(LoraConfig(target_modules=[entry]))
        target_lora(config, base, [entry])
        targets[entry] = (sorted(config.target_modules), sorted(config.target_parameters or []))
    attention = ["k_proj", "o_proj", "q_proj", "v_proj"]
    experts = ["experts.down_proj", "experts.gate_up_proj"]
    assert targets["attention"] == (attention, [])
    assert targets["experts"] == ([], experts)
    # The router (mlp.gate) is never a target: peft's own "all-linear" would put LoRA on it here.
    assert targets["attention+experts"] == targets["all-linear"] == targets["all"] == (attention, experts)
    model = attach_lora(base, LoraConfig(r=2))  # the default targets: all-linear
    r, hidden, moe, num_experts, layers = 2, 64, 32, 4, 2
    per_expert = r * (hidden + 2 * moe) + r * (moe + hidden)  # gate_up: A (r, in) + B (out, r); down
    assert count_trainable_by_kind(model) == {
        "attention": layers * r * ((64 + 64) + (64 + 32) * 2 + (64 + 64)),  # q, k, v, o (4 heads of 16)
        "experts": layers * num_experts * per_expert,
        "other": 0,
    }


def test_router_load_balancing_loss_is_added_when_on(embedded_cache: Path) -> None:
    ids = torch.randint(0, 1000, (1, 16))
    off = load_quantized_base(moe_config())(input_ids=ids, labels=ids)
    on = load_quantized_base(moe_config(router_aux_loss=True, router_aux_loss_coef=0.5))(
        input_ids=ids, labels=ids
    )
    assert off.aux_loss is None and on.aux_loss is not None
    torch.testing.assert_close(on.loss, off.loss + 0.5 * on.aux_loss)


def test_unquantized_experts_opt_in_keeps_the_checkpoint_weights(embedded_cache: Path) -> None:
    model = load_quantized_base(moe_config(quantize_experts=False, upcast_unquantized_params=False))
    # transformers 5 saves the fused experts in the per-expert layout of the hub checkpoints: read
    # them back through transformers.
    checkpoint = AutoModelForCausalLM.from_pretrained(resolve_embedded(TINY_MOE)).state_dict()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        for name, module in find_fused_experts(model).supported.items():
            assert isinstance(module, GroupedExperts)
            for weight in expert_weight_names(module):
                torch.testing.assert_close(
                    getattr(module, weight), checkpoint[f"{name}.{weight}"], rtol=0, atol=0
                )
            module.__class__ = module.source_cls
        model.set_experts_implementation("eager")
        torch.testing.assert_close(ours, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_unquantized_experts_sit_out_pefts_fp32_upcast(
    embedded_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = moe_config(
        quantize_experts=False, upcast_unquantized_params=False, bnb_4bit_compute_dtype="bfloat16"
    )
    prepare = peft.prepare_model_for_kbit_training
    seen: list[list[torch.dtype]] = []  # the 3-D weights peft's preparation saw, per call

    def spy(model: PreTrainedModel, **kwargs: object) -> PreTrainedModel:
        prepared = prepare(model, **kwargs)
        seen.append([p.dtype for p in model.parameters() if p.ndim == 3])
        return prepared

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", spy)
    base = load_trainable_base(cfg)
    assert seen == [[]]  # peft's cast to fp32 never saw them
    experts = experts_modules(base)
    assert all(m.gate_up_proj.dtype == torch.bfloat16 and not m.gate_up_proj.requires_grad for m in experts)
    # Without that, peft would hold all of them in fp32 until precision.py casts them back.
    assert prepare(load_quantized_base(cfg)).model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32


def tiny_llama4(path: Path) -> Path:
    """A MoE whose fused experts are not built on transformers' experts interface (Llama-4)."""
    config = Llama4TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
    )
    Llama4ForCausalLM(config).save_pretrained(path)
    return path


def test_moe_layouts_and_settings_that_cannot_apply_are_refused(tmp_path: Path, embedded_cache: Path) -> None:
    llama4 = str(tiny_llama4(tmp_path / "llama4"))
    with pytest.raises(ConfigError, match=r"Llama4ForCausalLM .*Llama4TextExperts.*quantize_experts=false"):
        load_quantized_base(ModelConfig(name_or_path=llama4))
    unquantized = ModelConfig(name_or_path=llama4, quantize_experts=False, upcast_unquantized_params=False)
    base = load_trainable_base(unquantized)  # explicitly unquantized: loads, experts in 16/32 bits
    experts = base.model.layers[0].feed_forward.experts
    assert experts.gate_up_proj.dtype == torch.float32 and not isinstance(experts, GroupedExperts)
    with pytest.raises(ConfigError, match=r"lora.dropout=0.05: .*ParamWrapper.*Fix: lora.dropout=0"):
        attach_lora(base, LoraConfig(dropout=0.05))
    dense = "embedded:tiny-gemma2"
    for cfg, message in [
        (
            ModelConfig(name_or_path=dense, quantize_experts=False, upcast_unquantized_params=False),
            "no fused",
        ),
        (ModelConfig(name_or_path=dense, router_aux_loss=True), "no router load-balancing loss"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_quantized_base(cfg)
    with pytest.raises(ConfigError, match="no fused experts to target"):
        attach_lora(
            load_trainable_base(ModelConfig(name_or_path=dense)), LoraConfig(target_modules=["experts"])
        )


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        (ModelConfig, {"quantize_experts": False}, "upcast_unquantized_params=false"),
        (ModelConfig, {"router_aux_loss_coef": 0.01}, "router_aux_loss=true"),
        (ModelConfig, {"router_aux_loss": True, "router_aux_loss_coef": -1.0}, "must be >= 0"),
        (LoraConfig, {"target_modules": ["all-linear", "q_proj"]}, "lists more than it"),
    ],
)
def test_schema_refuses_moe_settings_that_contradict(section: type, values: dict, message: str) -> None:
    extra = {"name_or_path": TINY_MOE} if section is ModelConfig else {}
    with pytest.raises(ConfigError, match=message):
        section(**extra, **values)


@pytest.mark.slow
def test_tiny_qwen3_moe_trains_generates_and_merges_with_defaults(
    tmp_path: Path, embedded_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    eval_loss = train_in_process(
        run_dir,
        *TINY_RUN,
        f"model.name_or_path={TINY_MOE}",
        "trainer.max_steps=3",
        "trainer.save_steps=100",  # no checkpoint: resuming is tested on the default model
        "eval.num_samples=2",
        "eval.max_new_tokens=4",
        "lora.dropout=0.05",  # not the default (0): the expert LoRA must apply it, and keep it on reload
        "model.gradient_checkpointing=true",  # as the MoE presets train: experts recomputed in backward
    )
    assert isinstance(eval_loss, float)
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    expert_keys = [k for k in adapter if ".experts." in k and "lora_" in k]
    assert len(expert_keys) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    assert all(adapter[k].abs().max() > 0 for k in expert_keys if "lora_B" in k)  # trained away from 0
    run = FinishedRun(run_dir)
    # Trained further (method=dpo's init_from): the expert LoRA loads trainable, with its dropout.
    again = attach_saved_adapter(load_trainable_base(run.config.model), run_dir / "adapter")
    assert count_trainable_by_kind(again)["experts"] == sum(adapter[k].numel() for k in expert_keys)
    assert isinstance(again.base_model.model.model.layers[0].mlp.experts.lora_dropout["default"], nn.Dropout)
    model = run.load_quantized_model()  # as qlora-generate and qlora-chat load it
    for module in experts_modules(model):
        assert isinstance(module, GroupedExperts) and isinstance(module.gate_up_proj, bnb.nn.Params4bit)
    prompt = [{"role": "user", "content": "What is 12 + 30?"}]
    assert len(generate_replies(model, run.load_tokenizer(), [prompt], run.config.eval)) == 1
    merged_dir = tmp_path / "merged"
    merge_run(run, merged_dir, "bf16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft
    assert (
        merged.dtype == torch.bfloat16
        and type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    )
    ids = torch.randint(0, 1000, (1, 16))
    base = AutoModelForCausalLM.from_pretrained(resolve_embedded(TINY_MOE), dtype=torch.bfloat16)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits.float()
        with_adapter = run.load_16bit_model(torch.bfloat16)(input_ids=ids).logits.float()
        base_logits = base(input_ids=ids).logits.float()
    # bf16 rounding of W + B A against W x + B (A x): a few bf16 ulps; the adapter moves far more.
    merge_error = (merged_logits - with_adapter).abs().max()
    effect = (merged_logits - base_logits).abs().max()
    assert merge_error < 0.02 and effect > 5 * merge_error
