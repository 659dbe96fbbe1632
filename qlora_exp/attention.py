"""Compiled flex attention: how it compiles, and exact attention for heads it cannot compile.

Flex attention skips the blocks a padding-free row's mask rules out (other examples, beyond a
sliding window), where SDPA is handed the row's full mask and computes every score: on an H200,
Gemma-3-4B ran 4.6x faster with it and Qwen3-30B-A3B 3.1x (BENCHMARKS.md). Its Triton kernels hold
blocks of queries and keys in shared memory, which heads wider than FLEX_MAX_HEAD_DIM overflow on an
H200 (Gemma-4's 512-wide global heads: the compile fails). For those layers the "flex_attention"
entry runs `segment_attention` instead: the row cut into the stretches no query sees past (the
examples of a padding-free row), the stretches stacked as a batch, SDPA with the block mask's own
mask evaluated on each stretch. Same scores as flex, a batch of examples' attention instead of the
row's square.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import PretrainedConfig, PreTrainedModel, masking_utils
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qlora_exp.errors import ConfigError

log = logging.getLogger(__name__)

# torch.compile's default limit is 8 compiles per function. Compiled flex attention needs one per
# mask kind (Gemma-2 alternates sliding-window and full layers), grad mode (training, evaluation)
# and static/dynamic shape: 8 already, and a 9th would fall back to uncompiled flex attention, which
# fails in backward (seen on an H200: BENCHMARKS.md). Shapes are dynamic after the second, so the
# count is bounded; this leaves room for it.
FLEX_RECOMPILE_LIMIT = 64
# Widest head compiled flex attention is given: 256 compiles and runs on an H200 (Gemma-2, Gemma-3);
# 512 does not fit its shared memory (Gemma-4's global layers, BENCHMARKS.md).
FLEX_MAX_HEAD_DIM = 256
# Where a BlockMask keeps its segments, with the (rows, length, device) they were planned for: every
# wide layer of a forward (and the checkpointed recompute) is handed the same mask object.
_PLAN_ATTRIBUTE = "_qlora_segment_plan"
# Flex attention's tunables of each model that set one, by its config (what the mask function and
# the attention modules are given): id -> (a weak reference to check identity, the settings).
_SETTINGS: dict[int, tuple[weakref.ref[PretrainedConfig], FlexSettings]] = {}


@dataclass(frozen=True)
class FlexSettings:
    """model.flex_block_size and model.flex_kernel_options of one model (None: torch's own)."""

    block_size: int | None = None
    kernel_options: dict[str, int] | None = None


def set_flex_attention(
    model: PreTrainedModel, block_size: int | None, kernel_options: dict[str, int] | None = None
) -> None:
    """Build `model`'s flex block masks in blocks of `block_size` x `block_size` positions (None:
    torch's 128), and run its flex kernels with `kernel_options` (None: torch's tiles for the GPU).

    Flex attention computes every block a query block shares with some key, masked or not. A
    padding-free row of ~240-token examples in 128-wide blocks computes ~40% more scores than in
    64-wide ones (BENCHMARKS.md). The kernel's own tiles must divide the block: on an H100/H200, 64
    fits 256-wide heads (Gemma-2, Gemma-3) and not 128-wide ones (their backward tiles are 128): a
    size the tiles do not divide is refused here (`check_flex_tiles`), not at the first step's compile.
    `kernel_options` are torch's own (flex_attention's `kernel_options`), passed to every flex call of
    the model: 8 warps instead of 4 for the backward of Gemma-2's 256-wide heads on an H200 took its
    kernel from 2.72 to 2.16 ms (benchmarks/flex_tiles.py)."""
    settings = FlexSettings(block_size, dict(kernel_options) if kernel_options else None)
    check_flex_tiles(model.config.get_text_config(), settings)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if settings == FlexSettings():
            _SETTINGS.pop(id(config), None)
        else:
            _SETTINGS[id(config)] = (weakref.ref(config), settings)


def check_flex_tiles(config: PretrainedConfig, settings: FlexSettings) -> None:
    """Refuse a block size that flex attention's kernel tiles on this GPU do not divide.

    torch picks the tiles per GPU generation and head width (Inductor's CUDA heuristics), the tiles
    in `settings.kernel_options` replacing them, and fails the compile with "Q and KV block size must
    be divisible by BLOCK_M and BLOCK_N" at the first training step; this asks the same heuristics at
    load. Without CUDA flex attention does not train (`trainable_attention`), and where torch has
    moved those heuristics nothing is checked here. Tiles that fit no block are refused earlier, in
    the config (schema.model.flex_kernel_options_problem).
    """
    if settings.block_size is None or not torch.cuda.is_available():
        return
    try:  # a private module of torch's, imported here so that its absence only skips the check
        from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic  # noqa: PLC0415
    except ImportError:
        return
    heuristic = CUDAConfigHeuristic()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim > FLEX_MAX_HEAD_DIM:
        return  # the wide-head path (segment_attention) has no kernel tiles
    dtype = torch.bfloat16  # the tile tables are the same for fp16; fp32 attention is not trained here
    options = settings.kernel_options or {}

    def tile(name: str, default: int, direction: str) -> int:
        return options.get(f"{direction}_{name}", options.get(name, default))

    forward = [
        (tile("BLOCK_M", c.block_m, "fwd"), tile("BLOCK_N", c.block_n, "fwd"))
        for c in heuristic.get_flex_attn_fwd_configs(head_dim, dtype)
    ]
    backward = [
        tuple(
            tile(name, getattr(c, name.lower()), "bwd")
            for name in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
        )
        for c in heuristic.get_flex_attn_bwd_configs(head_dim, dtype)
    ]
    size = settings.block_size
    if not (
        any(all(size % t == 0 for t in tiles) for tiles in forward)
        and any(all(size % t == 0 for t in tiles) for tiles in backward)
    ):
        raise ConfigError(
            f"model.flex_block_size={size}: flex attention's kernel tiles for {head_dim}-wide heads on "
            f"this GPU (forward {forward}, backward {backward}) do not divide it, so its compile would "
            "fail at the first step. Fix: a multiple of the largest tile (e.g. 128), or "
            "model.flex_block_size=null for torch's default"
        )


def flex_settings(config: PretrainedConfig | None) -> FlexSettings:
    """What `set_flex_attention` gave the model of `config` (torch's own where nothing was set)."""
    entry = _SETTINGS.get(id(config))
    return entry[1] if entry is not None and entry[0]() is config else FlexSettings()


@contextmanager
def _sparse_block_size(size: int | None) -> Iterator[None]:
    """transformers' flex_attention_mask calls create_block_mask with torch's default block size and
    no switch for it: while it runs, its module's create_block_mask is given `size`."""
    if size is None:
        yield
        return
    original = masking_utils.create_block_mask
    masking_utils.create_block_mask = functools.partial(original, BLOCK_SIZE=size)
    try:
        yield
    finally:
        masking_utils.create_block_mask = original


def _dynamic_flex_attention_mask(*args: Any, **kwargs: Any) -> BlockMask:
    """transformers' flex block mask, compiled for symbolic row lengths (`configure_flex_compile`), in
    the model's blocks (`set_flex_attention`)."""
    size = flex_settings(kwargs.get("config")).block_size
    with torch._dynamo.config.patch(assume_static_by_default=False), _sparse_block_size(size):
        return masking_utils.flex_attention_mask(*args, **kwargs)


def configure_flex_compile() -> None:
    """Set up compiled flex attention for any model that uses it. Idempotent.

    Block masks: transformers builds each with `create_block_mask(..., _compile=True)` and offers no
    switch for how it compiles, so this replaces the "flex_attention" entry of its mask registry
    (the extension point transformers provides) with the same function under a dynamic-shape
    compile. Two gains: one compile serves every row length instead of a static compile then a
    dynamic recompile; and before torch 2.13, a static compile lowers the mask's stable argsort to
    a Triton sort whose first compile takes many minutes once a row spans more than 64 blocks of
    128 tokens (pytorch/pytorch#182060; an H200 with torch 2.11 stalled on it, BENCHMARKS.md),
    while with a symbolic length inductor leaves the argsort to ATen.

    Attention: the "flex_attention" entry of transformers' attention registry becomes
    `flex_attention_or_segments` (heads wider than FLEX_MAX_HEAD_DIM off compiled flex).

    Recompiles: raises torch.compile's per-function limit to FLEX_RECOMPILE_LIMIT (see there).
    """
    ALL_MASK_ATTENTION_FUNCTIONS.register("flex_attention", _dynamic_flex_attention_mask)
    ALL_ATTENTION_FUNCTIONS.register("flex_attention", flex_attention_or_segments)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)


def flex_attention_trains_here() -> bool:
    """Whether flex attention can train on this machine: torch has its backward for CUDA only."""
    return torch.cuda.is_available()


def trainable_attention(implementation: str) -> str:
    """`implementation`, or eager (exact, soft-cap kept) with a warning for flex attention where it
    cannot train: every path that loads a model or switches its attention goes through here."""
    if implementation == "flex_attention" and not flex_attention_trains_here():
        log.warning(
            "attention flex_attention: no CUDA GPU, and flex attention has no backward on the CPU; "
            "eager attention instead (same results, slower)"
        )
        return "eager"
    return implementation


def flex_attention_or_segments(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' flex attention with the model's kernel options (`set_flex_attention`), or
    `segment_attention` for heads too wide to compile."""
    if query.shape[-1] <= FLEX_MAX_HEAD_DIM or not isinstance(attention_mask, BlockMask):
        options = flex_settings(getattr(module, "config", None)).kernel_options
        if options is not None and kwargs.get("kernel_options") is None:
            kwargs["kernel_options"] = options
        # None is what transformers passes where no mask is needed; its flex forward then masks nothing.
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"flex attention on {query.shape[-1]}-wide heads with {unsupported}: the wide-head path "
                "(SDPA per example) does not apply it. Fix: model.attn_implementation=eager"
            )
    output = segment_attention(
        query,
        key,
        value,
        attention_mask,
        position_ids=kwargs.get("position_ids"),
        scaling=kwargs.get("scaling"),
        dropout=kwargs.get("dropout", 0.0),
    )
    return output, None


@dataclass(frozen=True)
class SegmentPlan:
    """Stretches of the flattened (rows x length) positions that attend only within themselves.

    `index` (segments, longest) holds each segment's flat positions, `valid` which of them are real
    (shorter segments are padded with their last position), `mask` (segments, 1, longest, longest)
    the block mask's own mask on each segment, and `attends` which queries may attend to anything
    (a query with no key gets 0, as in flex attention).
    """

    index: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    attends: torch.Tensor


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    *,
    position_ids: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of (batch, heads, length, dim) inputs under `block_mask`, as SDPA over segments;
    returns (batch, length, heads, dim), as transformers' attention functions do."""
    batch, heads, length, dim = query.shape
    if key.shape[-2] != length:
        raise NotImplementedError(
            f"flex attention on {dim}-wide heads with {key.shape[-2]} keys for {length} queries (a KV "
            "cache): the wide-head path computes training and evaluation forwards only. "
            "Fix: generate with eager attention (qlora-generate does)"
        )
    shape = (batch, length, query.device)
    cached: tuple[tuple[int, int, torch.device], SegmentPlan] | None = getattr(
        block_mask, _PLAN_ATTRIBUTE, None
    )
    if cached is not None and cached[0] == shape:
        plan = cached[1]
    else:
        plan = plan_segments(block_mask, position_ids, batch, length, query.device)
        setattr(block_mask, _PLAN_ATTRIBUTE, (shape, plan))

    def stack(states: torch.Tensor) -> torch.Tensor:  # (batch, h, length, dim) -> (segments, h, longest, dim)
        flat = states.transpose(1, 2).reshape(batch * length, states.shape[1], dim)
        return flat[plan.index].transpose(1, 2)

    attended = F.scaled_dot_product_attention(
        stack(query),
        stack(key),
        stack(value),
        attn_mask=plan.mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=key.shape[1] != heads,
    )
    attended = attended.transpose(1, 2) * plan.attends[..., None, None].to(attended.dtype)
    output = attended.new_zeros(batch * length, heads, dim)
    output[plan.index[plan.valid]] = attended[plan.valid]
    return output.view(batch, length, heads, dim)


def plan_segments(
    block_mask: BlockMask,
    position_ids: torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
) -> SegmentPlan:
    """Segments of `block_mask`'s rows: a row's examples where its positions restart (a padding-free
    row) and the mask keeps them apart, otherwise the whole row."""
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None and position_ids.shape == (batch, length) and length > 1:
        restarts = position_ids[:, 1:].to(device) != position_ids[:, :-1].to(device) + 1
        rows, columns = restarts.nonzero(as_tuple=True)
        # A restart splits the row only where the mask forbids the first token of an example to see
        # the token before it; a mask that lets examples see each other keeps them together.
        apart = ~_mask_at(block_mask, rows, columns + 1, columns)
        starts[rows[apart], columns[apart] + 1] = True
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([flat_starts[1:], flat_starts.new_tensor([batch * length])])
    sizes = ends - flat_starts
    longest = int(sizes.max())
    offsets = torch.arange(longest, device=device)
    valid = offsets[None, :] < sizes[:, None]
    index = flat_starts[:, None] + torch.minimum(offsets[None, :], sizes[:, None] - 1)
    rows, positions = index // length, index % length
    mask = _mask_at(block_mask, rows[:, :, None], positions[:, :, None], positions[:, None, :])
    mask &= valid[:, :, None] & valid[:, None, :]
    attends = mask.any(dim=-1)
    # A query with no key would make SDPA's softmax NaN; it attends to itself and its output is zeroed.
    mask |= ~attends[:, :, None] & torch.eye(longest, dtype=torch.bool, device=device)
    return SegmentPlan(index=index, valid=valid, mask=mask[:, None], attends=attends)


def _mask_at(
    block_mask: BlockMask, rows: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """The block mask's mask_mod at broadcast (row, query, key) positions (head 0: transformers'
    masks are the same for every head)."""
    head = torch.zeros((), dtype=torch.long, device=rows.device)
    mask_rows = rows if block_mask.kv_num_blocks.shape[0] > 1 else torch.zeros_like(rows)
    return block_mask.mask_mod(mask_rows, head, queries, keys).expand(
        torch.broadcast_shapes(rows.shape, queries.shape, keys.shape)
    )
