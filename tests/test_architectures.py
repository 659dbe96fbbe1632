"""Every supported architecture through the real QLoRA path on its tiny embedded checkpoint: trains,
evaluates, generates held-out samples and merges; multimodal classes train their language model only."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma3Config,
    LlavaConfig,
    T5Config,
)

from qlora_exp.cli.merge import merge_run
from qlora_exp.errors import ConfigError
from qlora_exp.model import build_quantized_model, count_trainable_parameters
from qlora_exp.multimodal import auto_model_class, non_text_modules
from qlora_exp.run.directory import ADAPTER_DIR, METRICS, SAMPLES_FILE
from qlora_exp.run.finished import FinishedRun
from qlora_exp.schema import to_schema
from tests.support import TINY_RUN, compose_config, train_in_process

# Embedded checkpoint -> the class it declares (and that loading, training and merging keep).
ARCHITECTURES = {
    "tiny-gemma3": "Gemma3ForCausalLM",
    "tiny-gemma3-mm": "Gemma3ForConditionalGeneration",
    "tiny-gemma4": "Gemma4ForCausalLM",
    "tiny-gemma4-mm": "Gemma4ForConditionalGeneration",
    "tiny-qwen3": "Qwen3ForCausalLM",
    "tiny-llama": "LlamaForCausalLM",
    "tiny-mistral": "MistralForCausalLM",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_trains_evaluates_generates_and_merges(tmp_path: Path, name: str) -> None:
    run_dir = tmp_path / "run"
    train_in_process(
        run_dir,
        *TINY_RUN,
        f"model.name_or_path=embedded:{name}",
        "model.gradient_checkpointing=true",  # as the architecture's real preset trains it
        "trainer.max_steps=2",
        "trainer.save_steps=100",  # no checkpoint: resuming is tested on the default model
        "eval.num_samples=1",
        "eval.max_new_tokens=3",
    )
    metrics = json.loads((run_dir / METRICS).read_text())
    assert metrics["trainable_params"] > 0
    assert all(torch.isfinite(torch.tensor([metrics["eval_loss_before"], metrics["eval_loss"]])))
    # LoRA's B matrices start at zero: non-zero after two steps means gradients reached every one.
    adapter = load_file(run_dir / ADAPTER_DIR / "adapter_model.safetensors")
    lora_b = [tensor for key, tensor in adapter.items() if "lora_B" in key]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)
    samples = [json.loads(line) for line in (run_dir / SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == 1 and samples[0]["generation"] is not None

    merged_dir = tmp_path / "merged"
    merge_run(FinishedRun(run_dir), merged_dir, "bf16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged).__name__ == ARCHITECTURES[name]
    assert not any(isinstance(module, peft.tuners.lora.LoraLayer) for module in merged.modules())


@pytest.mark.parametrize(("multimodal", "text"), [("tiny-gemma3-mm", "tiny-gemma3")])
def test_multimodal_class_trains_exactly_its_text_model(multimodal: str, text: str) -> None:
    """LoRA `all-linear` adapts the same layers in Gemma3ForConditionalGeneration as in the text-only
    Gemma3ForCausalLM of the same shape; the SigLIP tower and projector stay unquantized and frozen."""

    def build(name: str) -> peft.PeftModel:
        schema = to_schema(compose_config("experiment=smoke", f"model.name_or_path=embedded:{name}"))
        return build_quantized_model(schema.model, schema.lora)

    model, text_model = build(multimodal), build(text)
    assert count_trainable_parameters(model) == count_trainable_parameters(text_model) > 0
    base = model.get_base_model()
    towers = non_text_modules(base)
    assert towers == ["model.vision_tower", "model.multi_modal_projector"]
    for tower in towers:
        modules = list(base.get_submodule(tower).modules())
        assert not any(
            isinstance(module, (bnb.nn.Linear4bit, peft.tuners.lora.LoraLayer)) for module in modules
        )
        assert not any(parameter.requires_grad for parameter in base.get_submodule(tower).parameters())
    # SigLIP's attention and MLP layers (which all-linear would otherwise reach) are there, in 16 bits.
    assert any(type(module) is torch.nn.Linear for module in base.get_submodule(towers[0]).modules())
    # The language model itself is quantized as in the text-only class.
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in base.model.language_model.modules())


def test_multimodal_gemma4_keeps_lora_and_4_bits_to_its_language_model() -> None:
    schema = to_schema(compose_config("experiment=smoke", "model.name_or_path=embedded:tiny-gemma4-mm"))
    base = build_quantized_model(schema.model, schema.lora).get_base_model()
    towers = non_text_modules(base)
    assert set(towers) == {
        "model.vision_tower",
        "model.audio_tower",
        "model.embed_vision",
        "model.embed_audio",
    }
    trained = [name for name, parameter in base.named_parameters() if parameter.requires_grad]
    assert trained and all(name.startswith("model.language_model.") for name in trained)
    for tower in towers:
        assert not any(
            isinstance(module, bnb.nn.Linear4bit) for module in base.get_submodule(tower).modules()
        )


def test_the_auto_class_builds_the_class_the_checkpoint_declares() -> None:
    # transformers maps Gemma-3/4 causal-LM loading to their multimodal class; a model type known only
    # as image-text-to-text (LLaVA) loads through that auto class; anything else is refused up front.
    assert auto_model_class(Gemma3Config()) is AutoModelForCausalLM
    assert auto_model_class(LlavaConfig()) is AutoModelForImageTextToText
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        auto_model_class(T5Config())
