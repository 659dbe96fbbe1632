"""Config composition and rejection: bad input fails before any model or data loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from qlora_exp.cli.train import CONF_DIR
from qlora_exp.errors import ConfigError, ExitCode
from qlora_exp.schema import (
    Config,
    DataConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    TrackingConfig,
    TrainerConfig,
    to_schema,
)
from tests.support import REPO, compose_config, run_cli_in_process, train_in_process

MODEL_PRESETS = [
    "tiny",
    "gemma2_9b_it",
    "gemma3_1b_it",
    "gemma3_4b_it",
    "gemma3_12b_it",
    "gemma3_27b_it",
    "gemma4_e4b_it",
    "gemma4_31b_it",
    "gemma4_26b_a4b_it",
    "qwen3_8b",
    "qwen3_30b_a3b",
    "llama31_8b_instruct",
    "mistral7b_instruct_v03",
    "qwen25_7b_instruct",
]

EXPERIMENTS = sorted(path.stem for path in (REPO / "experiments").glob("*.yaml"))
GROUP_SCHEMAS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "tracking": TrackingConfig,
    "method": MethodConfig,
}
# All that the default presets (model=tiny, lora=default, data=synthetic, trainer=default, method=sft,
# tracking=wandb) change from the dataclass defaults. Any other difference is a default kept in two places.
DEFAULT_PRESET_CHANGES = {"model": {"name_or_path": "embedded:tiny-gemma2", "gradient_checkpointing": False}}
# Preset values equal to the schema's default on purpose: pinned against a change of that default.
PINNED_REPEATS = {("model/tiny", "attn_implementation")}


def test_default_config_is_the_schema_defaults_but_the_tiny_model_preset() -> None:
    composed = OmegaConf.to_container(compose_config(), resolve=True)
    assert isinstance(composed, dict)
    expected = dataclasses.asdict(Config())
    for section, changes in DEFAULT_PRESET_CHANGES.items():
        for key, value in changes.items():
            assert expected[section][key] != value, f"{section}.{key} is no change: drop the exception"
            expected[section][key] = value
    assert composed.keys() == expected.keys()
    for key, value in expected.items():
        assert composed[key] == value, f"{key}: the composed default config differs from the schema"


def test_group_presets_set_only_what_they_change() -> None:
    repeats = []
    for group, schema in GROUP_SCHEMAS.items():
        defaults = dataclasses.asdict(schema())
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            preset = OmegaConf.to_container(OmegaConf.load(path))
            assert isinstance(preset, dict)
            preset.pop("defaults", None)
            assert preset.keys() <= defaults.keys(), path
            repeats += [
                f"{group}/{path.stem}: {key}={value!r}"
                for key, value in preset.items()
                if value == defaults[key] and (f"{group}/{path.stem}", key) not in PINNED_REPEATS
            ]
    assert not repeats, f"presets repeat the schema's defaults (qlora_exp/schema/ owns them): {repeats}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    schema = to_schema(compose_config(f"experiment={experiment}"))
    assert schema.model.name_or_path


def test_default_config_is_the_embedded_tiny_model() -> None:
    schema = to_schema(compose_config())
    assert schema.model.name_or_path == "embedded:tiny-gemma2"
    assert schema.seed == 42
    assert schema.tracking.backend == "wandb" and schema.tracking.mode == "offline"
    assert schema.model.attn_implementation == "eager"


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_presets_compose(preset: str) -> None:
    composed = compose_config(f"model={preset}")
    schema = to_schema(composed)
    # `--cfg job` prints this composition: the model is named once (the tokenizer reads the same key).
    assert OmegaConf.to_yaml(composed).count(schema.model.name_or_path) == 1
    # Gemma-2 soft-caps attention logits, which SDPA drops; Gemma-3 and -4 do not (SDPA is exact).
    if preset.startswith("gemma2"):
        assert schema.model.attn_implementation != "sdpa"


def test_prototype_preset_matches_the_reviewed_experiment() -> None:
    schema = to_schema(compose_config("experiment=prototype_gemma2_9b"))
    assert schema.model.name_or_path == "google/gemma-2-9b-it"
    assert (schema.lora.r, schema.lora.alpha, schema.lora.dropout) == (16, 32, 0.1)
    assert schema.data.sample_size == 2000 and schema.seed == 42 and schema.data.max_length == 512
    assert schema.trainer.num_train_epochs == 3 and schema.trainer.per_device_train_batch_size == 1
    assert schema.trainer.learning_rate == 2e-4


def test_gemma3_prototype_is_the_reviewed_experiment_on_the_other_model() -> None:
    gemma3 = OmegaConf.to_container(compose_config("experiment=prototype_gemma3_4b"))
    gemma2 = OmegaConf.to_container(compose_config("experiment=prototype_gemma2_9b"))
    assert isinstance(gemma3, dict) and isinstance(gemma2, dict)
    assert gemma3.pop("model") == OmegaConf.to_container(compose_config("model=gemma3_4b_it").model)
    gemma2.pop("model")
    assert gemma3 == gemma2


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("trainer.learning_rate=-1", "trainer.learning_rate"),
        ("trainer.max_steps=-1 trainer.num_train_epochs=0", "trainer.max_steps"),
        ("data.source=local", "data.path"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("model.bnb_4bit_quant_type=int3", "model.bnb_4bit_quant_type"),
        ("tracking.mode=sometimes", "tracking.mode"),
        ("model.flex_block_size=64", "model.flex_block_size"),  # eager attention: no block mask
        ("model.attn_implementation=flex_attention model.flex_block_size=40", "model.flex_block_size"),
        (
            "model.flex_kernel_options={bwd_num_warps:8}",
            "model.flex_kernel_options",
        ),  # eager: no flex kernels
        ("model.attn_implementation=flex_attention model.flex_kernel_options=8", "model.flex_kernel_options"),
        ("model.uncheckpointed_layers=2", "model.uncheckpointed_layers"),  # the tiny model: no checkpointing
    ],
)
def test_impossible_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_schema(compose_config(*override.split()))


@pytest.mark.parametrize(
    ("overrides", "options"),
    [
        (
            ("model.attn_implementation=flex_attention", "model.flex_kernel_options={bwd_num_warps:8}"),
            {"bwd_num_warps": 8},
        ),
        (
            ("model.attn_implementation=flex_attention", "+model.flex_kernel_options.bwd_num_warps=8"),
            {"bwd_num_warps": 8},
        ),
        (("model=gemma2_9b_it",), {"bwd_num_warps": 8}),
        (("model=gemma2_9b_it", "model.flex_kernel_options.bwd_num_warps=4"), {"bwd_num_warps": 4}),
        (
            ("model=gemma2_9b_it", "+model.flex_kernel_options.USE_TMA=true"),
            {"bwd_num_warps": 8, "USE_TMA": True},
        ),
        (("model=gemma2_9b_it", "model.flex_kernel_options=null"), None),
    ],
)
def test_flex_kernel_options_are_set_changed_and_dropped_from_the_command_line(
    overrides: tuple[str, ...], options: dict | None
) -> None:
    assert to_schema(compose_config(*overrides)).model.flex_kernel_options == options


def test_cli_rejects_an_unknown_key_before_loading_anything(tmp_path: Path) -> None:
    # Hydra itself rejects it while composing: the console script's own exit code and message.
    result = run_cli_in_process("qlora-train", "lora.rr=3", f"hydra.run.dir={tmp_path}/run")
    output = result.stdout + result.stderr
    assert result.returncode == ExitCode.CONFIG, output
    assert "rr" in output
    assert "Loading weights" not in output and "LoRA:" not in output
    assert not (tmp_path / "run").exists()


def test_a_wrong_type_is_rejected_while_composing() -> None:
    # The same composition step as the unknown key above, which the console script turns into exit 1.
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("trainer.learning_rate=abc")
    assert "trainer.learning_rate" in str(info.value.__cause__ or info.value)


def test_a_run_rejects_an_impossible_combination_before_loading_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(tmp_path / "run", "data.source=local")
    assert exit_info.value.code == ExitCode.CONFIG
    assert "data.path" in caplog.text
    assert "LoRA:" not in caplog.text
    assert not (tmp_path / "run").exists()


def test_gemma_preset_names_the_model_in_exactly_one_place() -> None:
    result = run_cli_in_process("qlora-train", "model=gemma2_9b_it", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("google/gemma-2-9b-it") == 1, result.stdout


def test_fsdp_preset_stores_4bit_weights_in_the_compute_dtype() -> None:
    schema = to_schema(compose_config("experiment=fsdp_qlora"))
    assert schema.model.bnb_4bit_quant_storage == schema.model.bnb_4bit_compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"model\.bnb_4bit_quant_storage"):
        to_schema(compose_config("experiment=fsdp_qlora", "model.bnb_4bit_compute_dtype=float16"))


def test_gemma2_gpu_preset_is_the_benchmarked_defaults_row() -> None:
    schema = to_schema(compose_config("experiment=gemma2_9b_gpu"))
    assert schema.model.name_or_path == "google/gemma-2-9b-it"
    assert (schema.model.attn_implementation, schema.model.use_liger_kernel) == ("flex_attention", True)
    assert (schema.model.upcast_unquantized_params, schema.model.fp32_residual) == (False, True)
    assert schema.data.packing == "padding_free"
    assert (schema.trainer.per_device_train_batch_size, schema.trainer.gradient_accumulation_steps) == (64, 1)
    assert (schema.trainer.optim, schema.trainer.learning_rate) == ("adamw_torch_fused", 2e-4)
