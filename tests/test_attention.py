"""Compiled flex attention's set-up, and the exact per-example SDPA path for heads flex cannot compile."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from transformers import PretrainedConfig
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
    packed_sequence_mask_function,
    padding_mask_function,
    sliding_window_overlay,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qlora_exp import attention
from qlora_exp.attention import (
    FlexSettings,
    check_flex_tiles,
    configure_flex_compile,
    flex_attention_or_segments,
    flex_settings,
    plan_segments,
    segment_attention,
    set_flex_attention,
)
from qlora_exp.data.packing import FlatteningCollator
from qlora_exp.errors import ConfigError
from qlora_exp.model import resolve_attention, resolve_source
from qlora_exp.schema import to_schema
from tests.support import compose_config, loss_and_gradients, tiny_lora_model

MaskMod = Callable[..., torch.Tensor]


@pytest.mark.slow  # a cold Inductor compile on the CPU: ~30-40 s
def test_flex_block_masks_compile_once_for_every_row_length_and_stay_exact() -> None:
    # What transformers calls for each forward of a padding-free flex model: the registry's mask.
    configure_flex_compile()
    configure_flex_compile()  # idempotent: loading a second model changes nothing
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    for lengths in ([300, 200, 500], [700, 100, 333, 90], [2000, 1500, 3000]):
        seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
        mask_mod = and_masks(causal_mask_function, packed_sequence_mask_function(seq))
        n = seq.shape[1]
        block_mask = ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](1, n, n, mask_function=mask_mod)
        exact = create_block_mask(mask_mod, 1, None, n, n, device="cpu", _compile=False)
        assert torch.equal(block_mask.to_dense(), exact.to_dense())
    # A static first compile would compile again for the second length (2 graphs, 3 with no
    # automatic dynamic); a symbolic one serves all three, and leaves the argsort to ATen.
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_a_models_flex_block_size_shapes_its_block_masks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_flex_compile()
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate([90, 150, 60])])[None]
    mask_mod = and_masks(causal_mask_function, packed_sequence_mask_function(seq))
    n = seq.shape[1]
    small, other = PretrainedConfig(), PretrainedConfig()
    model = SimpleNamespace(config=small)  # what set_flex_attention reads of a model

    def block_mask(config: PretrainedConfig) -> BlockMask:
        build = ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"]
        with torch.compiler.set_stance("force_eager"):  # its compile is tested above
            return build(1, n, n, mask_function=mask_mod, config=config, device="cpu")

    set_flex_attention(model, 64)  # type: ignore[arg-type]
    masks = {"small": block_mask(small), "other": block_mask(other)}
    assert masks["small"].BLOCK_SIZE == (64, 64) and masks["other"].BLOCK_SIZE == (128, 128)
    allowed = create_mask(mask_mod, 1, None, n, n, device="cpu")[0, 0]
    for mask in masks.values():  # every allowed position lies in a block the kernel computes
        size = mask.BLOCK_SIZE[0]
        blocks = mask.to_dense()[0, 0].bool().repeat_interleave(size, 0).repeat_interleave(size, 1)
        assert not (allowed & ~blocks[:n, :n]).any()
    computed = {name: int(mask.to_dense().sum()) * mask.BLOCK_SIZE[0] ** 2 for name, mask in masks.items()}
    assert computed["small"] < 0.8 * computed["other"]  # finer blocks skip more masked positions
    set_flex_attention(model, None)  # type: ignore[arg-type]
    assert flex_settings(small).block_size is None and block_mask(small).BLOCK_SIZE == (128, 128)


def test_a_flex_block_size_the_gpus_kernel_tiles_do_not_divide_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Inductor's own tile heuristics, asked as on an H100/H200 (compute capability 9.0).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    wide, narrow = PretrainedConfig(head_dim=256), PretrainedConfig(head_dim=128)
    check_flex_tiles(wide, FlexSettings(64))  # Gemma-2's heads: the preset's 64 fits their tiles
    check_flex_tiles(narrow, FlexSettings(128))
    with pytest.raises(ConfigError, match=r"model\.flex_block_size=64: .* 128-wide heads .* Fix: "):
        check_flex_tiles(narrow, FlexSettings(64))
    # Tiles given as kernel options replace torch's: 64-wide ones make 64 fit the 128-wide heads.
    check_flex_tiles(narrow, FlexSettings(64, {"fwd_BLOCK_M": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64}))
    with pytest.raises(ConfigError, match=r"flex_block_size=64: .* 256-wide heads"):
        check_flex_tiles(wide, FlexSettings(64, {"fwd_BLOCK_M": 128}))
    with pytest.raises(ConfigError, match=r"flex_block_size=32: .* 256-wide heads"):
        set_flex_attention(SimpleNamespace(config=wide), 32)  # type: ignore[arg-type]
    assert flex_settings(wide) == FlexSettings()  # refused before anything was set


def test_a_models_flex_kernel_options_reach_each_of_its_flex_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def flex_forward(module: Any, *args: Any, **kwargs: Any) -> tuple[None, None]:
        seen.append(kwargs.get("kernel_options"))
        return None, None

    monkeypatch.setattr(attention, "flex_attention_forward", flex_forward)
    tuned, other = PretrainedConfig(), PretrainedConfig()
    set_flex_attention(SimpleNamespace(config=tuned), None, {"bwd_num_warps": 8})  # type: ignore[arg-type]
    q = torch.zeros(1, 2, 4, 8)
    for config in (tuned, other):
        flex_attention_or_segments(SimpleNamespace(config=config), q, q, q, None)  # type: ignore[arg-type]
    # A caller's own options win over the model's.
    flex_attention_or_segments(SimpleNamespace(config=tuned), q, q, q, None, kernel_options={"num_warps": 4})  # type: ignore[arg-type]
    assert seen == [{"bwd_num_warps": 8}, None, {"num_warps": 4}]
    set_flex_attention(SimpleNamespace(config=tuned), None, None)  # type: ignore[arg-type]
    assert flex_settings(tuned) == FlexSettings()


def test_flex_attention_may_compile_for_every_mask_mode_and_shape_kind() -> None:
    # 2 mask kinds x training/evaluation x static/dynamic = 8 compiles of flex attention: the
    # default limit (8) leaves no room, and one more falls back to uncompiled flex attention.
    configure_flex_compile()
    assert torch._dynamo.config.recompile_limit >= 2 * 2 * 2 * 4
    assert ALL_ATTENTION_FUNCTIONS["flex_attention"] is flex_attention_or_segments


def positions_of(lengths: list[int]) -> torch.Tensor:
    """position_ids of one padding-free row holding examples of these lengths."""
    return torch.cat([torch.arange(n) for n in lengths])[None]


def documents_of(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def block_mask_of(mask_mod: MaskMod, batch: int, length: int) -> BlockMask:
    return create_block_mask(
        mask_mod, batch, None, length, length, device="cpu", _compile=False, BLOCK_SIZE=8
    )


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod: MaskMod, batch: int
) -> torch.Tensor:
    """SDPA over each whole row with the mask evaluated everywhere (what SDPA does today), as
    (batch, length, heads, dim); queries with no key give 0, as in flex attention."""
    length = q.shape[2]
    mask = create_mask(mask_mod, batch, 1, length, length, device="cpu")
    attends = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | ~attends, enable_gqa=k.shape[1] != q.shape[1]
    )
    return (out * attends).transpose(1, 2)


def qkv(batch: int, length: int, heads: int = 4, kv_heads: int = 2, dim: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes
    ]


CASES = {
    # one padding-free row of four examples, causal
    "padding-free": (
        [5, 9, 3, 7],
        lambda d: and_masks(causal_mask_function, packed_sequence_mask_function(d)),
    ),
    # the same row under a sliding window of 4 (Gemma's local layers)
    "sliding-window": (
        [5, 9, 3, 7],
        lambda d: and_masks(
            causal_mask_function, sliding_window_overlay(4), packed_sequence_mask_function(d)
        ),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_segment_attention_equals_the_whole_rows_attention_and_its_gradients(case: str) -> None:
    lengths, make_mask = CASES[case]
    total = sum(lengths)
    mask_mod = make_mask(documents_of(lengths))
    block_mask = block_mask_of(mask_mod, 1, total)
    q, k, v = qkv(1, total)
    got = segment_attention(q, k, v, block_mask, position_ids=positions_of(lengths))
    expected = dense_reference(q, k, v, mask_mod, 1)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
    # The speed comes from here: one segment per example, none longer than the longest example.
    plan = plan_segments(block_mask, positions_of(lengths), 1, total, torch.device("cpu"))
    assert plan.valid.sum(dim=1).tolist() == lengths


def test_a_padded_batch_keeps_rows_apart_and_zeroes_queries_that_see_nothing() -> None:
    # Two rows, the second left-padded by 3: its pad queries see no key at all.
    batch, length = 2, 12
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[1, :3] = False
    mask_mod = and_masks(causal_mask_function, padding_mask_function(padding))
    block_mask = block_mask_of(mask_mod, batch, length)
    positions = torch.stack([torch.arange(length), (torch.arange(length) - 3).clamp(min=0)])
    q, k, v = qkv(batch, length)
    got = segment_attention(q, k, v, block_mask, position_ids=positions)
    torch.testing.assert_close(got, dense_reference(q, k, v, mask_mod, batch))
    assert torch.all(got[1, :3] == 0)
    # Rows stay apart and whole; pad queries that see nothing may stand alone.
    sizes = plan_segments(block_mask, positions, batch, length, torch.device("cpu")).valid.sum(1).tolist()
    assert sizes[0] == length and sizes[-1] == length - 3 and sum(sizes) == batch * length


def test_positions_that_restart_under_a_mask_that_joins_the_examples_keep_one_segment() -> None:
    # Plain causal over the row (examples see each other): cutting at the restarts would be wrong.
    lengths = [6, 5, 7]
    total = sum(lengths)
    block_mask = block_mask_of(causal_mask_function, 1, total)
    q, k, v = qkv(1, total)
    got = segment_attention(q, k, v, block_mask, position_ids=positions_of(lengths))
    torch.testing.assert_close(got, dense_reference(q, k, v, causal_mask_function, 1))
    assert plan_segments(block_mask, positions_of(lengths), 1, total, torch.device("cpu")).valid.shape[0] == 1


def test_wide_heads_with_a_softcap_are_refused_with_the_fix() -> None:
    q, k, v = qkv(1, 8, dim=attention.FLEX_MAX_HEAD_DIM + 8)
    block_mask = block_mask_of(causal_mask_function, 1, 8)
    with pytest.raises(NotImplementedError, match=r"softcap.*model\.attn_implementation=eager"):
        flex_attention_or_segments(torch.nn.Module(), q, k, v, block_mask, softcap=50.0)


def test_a_gemma4_on_the_wide_head_path_trains_as_on_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny Gemma-4 with every layer's heads treated as too wide for flex (as its 512-wide global
    layers are on an H200): loss and LoRA gradients of a padding-free batch equal eager attention's."""
    rows = [list(range(10, 10 + n)) for n in (7, 12, 5)]
    batch = FlatteningCollator()([{"input_ids": ids, "labels": ids} for ids in rows])
    eager = tiny_lora_model("tiny-gemma4", "eager").train()
    eager_loss, eager_grads = loss_and_gradients(eager, batch)

    calls = []
    original = attention.segment_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "flex_attention_trains_here", lambda: True)  # as on a GPU
    monkeypatch.setattr(attention, "FLEX_MAX_HEAD_DIM", 0)
    monkeypatch.setattr(attention, "segment_attention", counted)
    model = tiny_lora_model("tiny-gemma4", "flex_attention").train()
    # The block masks are built as on a GPU but not compiled (a minute on the CPU; their compile is
    # tested above): what is under test is the attention computed from them.
    with torch.compiler.set_stance("force_eager"):
        loss, grads = loss_and_gradients(model, batch)
    assert calls, "the wide-head path ran"
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5)


def test_flex_attention_trains_as_eager_where_it_has_no_backward(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(attention, "flex_attention_trains_here", lambda: False)  # a CPU-only machine
    schema = to_schema(compose_config("experiment=smoke", "model.attn_implementation=flex_attention"))
    with caplog.at_level(logging.WARNING, logger="qlora_exp.attention"):
        implementation = resolve_attention(schema.model, resolve_source(schema.model))
    assert implementation == "eager"
    assert "no backward on the CPU" in caplog.text
    monkeypatch.setattr(attention, "flex_attention_trains_here", lambda: True)
    assert resolve_attention(schema.model, resolve_source(schema.model)) == "flex_attention"
