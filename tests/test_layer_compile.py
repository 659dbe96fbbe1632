"""model.compile_layers (qlora_exp/layer_compile.py): the compiled layers train as the eager ones do and
share one compiled graph; evaluation stays eager; without CUDA nothing compiles; Liger's in-layer
kernels stay out; the bench's compile and lora_dropout keys. model.uncheckpointed_layers: the last
layers keep their activations and train as checkpointed ones do."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from qlora_exp import layer_compile
from qlora_exp import model as model_module
from qlora_exp.bench.settings import order_settings, parse_setting, standard_settings
from qlora_exp.errors import ConfigError
from qlora_exp.schema import ModelConfig, to_schema
from tests.support import compose_config, loss_and_gradients, tiny_lora_model


def _counted(calls: list[int], function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    calls.append(1)
    return function(*args, **kwargs)


def _batch(length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 200, (2, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.mark.slow
def test_compiled_layers_train_as_eager_ones_and_share_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    # With gradient checkpointing, as every real model's preset has it: it stays outside the compiled code.
    model = tiny_lora_model("tiny-gemma2", "eager", "model.gradient_checkpointing=true").train()
    layers = layer_compile.decoder_layers(model)
    checkpoints = []
    for layer in layers:
        layer._gradient_checkpointing_func = partial(
            _counted, checkpoints, layer._gradient_checkpointing_func
        )
    batch = _batch(24)
    eager_loss, eager_grads = loss_and_gradients(model, batch)

    torch._dynamo.reset()  # nothing compiled by earlier tests in this process counts
    counters.clear()
    # CUDA is what the switch needs for speed; the mechanism (tracing, reuse, dispatch) is the same on
    # the CPU. aot_eager traces forward and backward as Inductor would, without generating kernels.
    checkpoints.clear()
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        assert layer_compile.compile_decoder_layers(model, backend="aot_eager") == len(layers) > 1
    loss, grads = loss_and_gradients(model, batch)
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)
    # Every layer ran its compiled forward through one graph (no per-layer recompiles, no graph
    # breaks), inside transformers' checkpoint function.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(checkpoints) == len(layers)
    assert not counters["graph_break"]

    model.eval()  # evaluation and generation run the layers as they are
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, eager_loss)
    assert counters["stats"]["unique_graphs"] == 1

    layer_compile.uncompile_decoder_layers(model)
    assert all("forward" not in vars(layer) for layer in layers)
    model.train()
    torch.testing.assert_close(loss_and_gradients(model, batch)[0], eager_loss)
    assert counters["stats"]["unique_graphs"] == 1


def test_uncompiling_restores_the_forward_each_layer_had(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_lora_model("tiny-gemma2", attention="eager")
    first, second, *_ = layer_compile.decoder_layers(model)
    hooked = first.forward
    first.forward = hooked  # an instance-level forward, as accelerate's hooks install
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        layer_compile.compile_decoder_layers(model, backend="eager")
    assert vars(first)["forward"] is not hooked and "forward" in vars(second)
    layer_compile.uncompile_decoder_layers(model)
    assert vars(first)["forward"] is hooked and "forward" not in vars(second)


def test_without_cuda_the_layers_stay_uncompiled_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tiny_lora_model("tiny-gemma2", attention="eager")
    with caplog.at_level(logging.WARNING, logger=layer_compile.__name__):
        assert layer_compile.compile_decoder_layers(model) == 0
    assert "no CUDA GPU, so the decoder layers run uncompiled" in caplog.text
    assert all("forward" not in vars(layer) for layer in layer_compile.decoder_layers(model))


def test_a_model_without_decoder_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.compile_layers: Linear has no decoder `layers`.*Fix"):
        layer_compile.compile_decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(
        ConfigError, match=r"uncheckpointed_layers: Linear has no .*Fix: model\.uncheckpointed_layers=0 "
    ):
        layer_compile.set_uncheckpointed_layers(torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize("compiled", [False, True])
def test_compiled_layers_keep_only_ligers_kernels_outside_them(
    monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(model_module, "apply_liger_kernel", lambda model, config: seen.update(config))
    monkeypatch.setattr(model_module, "compile_decoder_layers", lambda model: seen.update(compiled=True))
    cfg = ModelConfig(name_or_path="x", use_liger_kernel=True, compile_layers=compiled)
    model_module.apply_speed_kernels(tiny_lora_model("tiny-gemma2", attention="eager").get_base_model(), cfg)
    off = dict.fromkeys(model_module.LIGER_LAYER_KERNELS, False)
    assert seen == ({**off, "compiled": True} if compiled else {})


def test_bench_compile_and_lora_dropout_keys_and_their_order() -> None:
    gemma = ModelConfig(name_or_path="x", attn_implementation="flex_attention", use_liger_kernel=True)
    defaults = standard_settings(gemma, 32)[2]
    compiled = parse_setting("c:compile=1,lora_dropout=0", defaults)
    assert (compiled.compile_layers, compiled.lora_dropout, defaults.lora_dropout) == (True, 0.0, None)
    # Liger's in-layer patches cannot be undone: settings that must run without them come first.
    plain = parse_setting("p:liger=0", defaults)
    assert [s.name for s in order_settings([defaults, compiled, plain])] == ["p", "c", "defaults"]
    for spec in ("x:compile=2", "x:lora_dropout=1", "x:lora_dropout=none"):
        with pytest.raises(ConfigError, match="--extra"):
            parse_setting(spec, defaults)


def test_a_later_model_compiles_afresh_not_as_a_recompile_of_the_first(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep's second job in the same process: torch.compile's in-memory state is dropped, once per
    new model, so its layers compile as a new process's would (not as a dynamic-shape recompile)."""
    resets: list[int] = []
    monkeypatch.setitem(layer_compile._PROCESS, "compiled_before", False)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    first = tiny_lora_model("tiny-gemma2", "eager", "lora.r=8")
    second = tiny_lora_model("tiny-gemma2", "eager", "lora.r=16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as layers compile only with CUDA
    with caplog.at_level(logging.INFO, logger="qlora_exp.layer_compile"):
        layer_compile.compile_decoder_layers(first, backend="aot_eager")
        assert not resets  # the process's first compile keeps what is there
        layer_compile.compile_decoder_layers(first, backend="aot_eager")
        assert not resets  # its layers are compiled already: nothing to drop
        layer_compile.compile_decoder_layers(second, backend="aot_eager")
    assert resets == [1]
    assert "compiling afresh" in caplog.text


def test_uncheckpointed_layers_keep_their_activations_and_train_the_same() -> None:
    model = tiny_lora_model("tiny-gemma2", "eager", "model.gradient_checkpointing=true").train()
    layers = layer_compile.decoder_layers(model)
    checkpoints: list[int] = []
    for layer in layers:
        layer._gradient_checkpointing_func = partial(
            _counted, checkpoints, layer._gradient_checkpointing_func
        )
    batch = _batch(24)
    all_loss, all_grads = loss_and_gradients(model, batch)
    assert len(checkpoints) == len(layers)

    layer_compile.set_uncheckpointed_layers(model, 1)
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 1) + [False]
    checkpoints.clear()
    loss, grads = loss_and_gradients(model, batch)
    assert len(checkpoints) == len(layers) - 1  # the last layer ran once, its activations kept
    torch.testing.assert_close(loss, all_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, all_grads[name])
    layer_compile.set_uncheckpointed_layers(model, 0)  # the bench's next setting: every layer again
    assert all(layer.gradient_checkpointing for layer in layers)
    with pytest.raises(
        ConfigError, match=rf"uncheckpointed_layers={len(layers)}: .* Fix: at most {len(layers) - 1}"
    ):
        layer_compile.set_uncheckpointed_layers(model, len(layers))


def test_uncheckpointed_layers_need_checkpointing_and_sft() -> None:
    with pytest.raises(
        ConfigError, match=r"model\.uncheckpointed_layers: is 2 but model\.gradient_checkpointing=false"
    ):
        ModelConfig(name_or_path="x", gradient_checkpointing=False, uncheckpointed_layers=2)
    model = tiny_lora_model("tiny-gemma2", "eager", "model.gradient_checkpointing=false")
    with pytest.raises(ConfigError, match="gradient checkpointing is off"):
        layer_compile.set_uncheckpointed_layers(model, 1)
    with pytest.raises(ConfigError, match=r"uncheckpointed_layers: is 1, but dpo's trainer \(TRL\)"):
        to_schema(
            compose_config(
                "experiment=dpo_smoke", "model.gradient_checkpointing=true", "model.uncheckpointed_layers=1"
            )
        )
    kept = to_schema(
        compose_config(
            "experiment=smoke", "model.gradient_checkpointing=true", "model.uncheckpointed_layers=1"
        )
    )
    assert kept.model.uncheckpointed_layers == 1
    defaults = standard_settings(ModelConfig(name_or_path="x"), 8)[2]
    assert parse_setting("keep2:uncheckpointed=2", defaults).uncheckpointed_layers == 2
