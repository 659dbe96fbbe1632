"""Flex attention's kernel tiles for Gemma-2-9B's training shapes, timed one by one on a GPU.

The profile of the Gemma-2-9B defaults (BENCHMARKS.md) spends 213 ms of a 1.7 s step in flex
attention, 145 ms of it in the backward kernel, which runs torch's default tiles for 256-wide heads
(Inductor's CUDA heuristics). This times the forward and the backward of compiled flex attention on
one padding-free row shaped like the bench's steps (16 query heads, 8 key/value heads, 256-wide,
logits soft-capped at 50, ~240-token examples in 64-position blocks), for torch's default tiles,
each tile set given here as `kernel_options`, and Inductor's own autotuning (`max-autotune`), and
prints a table: milliseconds per call, and the speed-up over the default.

    python benchmarks/flex_tiles.py --out flex_tiles.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

log = logging.getLogger("flex_tiles")

HEADS, KV_HEADS, HEAD_DIM, SOFTCAP = 16, 8, 256, 50.0  # google/gemma-2-9b-it
# (BLOCK_M, BLOCK_N, num_stages, num_warps): torch's sm90 default for 256-wide heads is (64, 32, 3, 4).
FORWARD_TILES = [
    (64, 64, 2, 4),
    (64, 64, 2, 8),
    (64, 32, 3, 8),
    (128, 32, 3, 8),
    (128, 64, 2, 8),
    (32, 64, 3, 4),
]
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages, num_warps); sm90 default (64, 64, 64, 64, 2, 4).
BACKWARD_TILES = [
    (64, 64, 64, 64, 1, 4),
    (64, 64, 64, 64, 2, 8),
    (64, 64, 64, 64, 1, 8),
    (32, 64, 64, 32, 1, 4),
    (32, 64, 64, 32, 2, 4),
    (32, 64, 64, 32, 3, 4),
    (32, 64, 64, 32, 2, 8),
    (32, 32, 32, 32, 3, 4),
    (32, 32, 32, 32, 3, 8),
    (32, 32, 32, 32, 4, 4),
    (64, 64, 64, 32, 2, 8),
    (16, 64, 64, 16, 2, 4),
]


def example_lengths(total: int, median: float, sigma: float, seed: int) -> list[int]:
    """Log-normal example lengths (capped at 512, as the bench's data.max_length) filling `total`."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(512, max(24, round(rng.lognormvariate(math.log(median), sigma)))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def row_mask(lengths: list[int], block: int, device: str) -> BlockMask:
    """Causal attention within each example of one padding-free row, in `block`-position blocks."""
    document = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )

    def same_example_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (q >= kv) & (document[q] == document[kv])

    total = sum(lengths)
    return create_block_mask(same_example_causal, 1, None, total, total, device=device, BLOCK_SIZE=block)


def softcap(score: torch.Tensor, b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def time_calls(fn: Any, repeats: int) -> float:
    """Milliseconds per call of fn(), on the GPU's clock, after two warm-up calls (the compile)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def measure(
    options: dict[str, int] | None, mode: str | None, mask: BlockMask, length: int, repeats: int
) -> dict[str, float]:
    """Forward and forward+backward milliseconds of compiled flex attention with these options."""
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, mode=mode)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(
        1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True
    )
    k = torch.randn(
        1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True
    )
    v = torch.randn(
        1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True
    )
    grad = torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)

    def forward() -> torch.Tensor:
        return compiled(
            q,
            k,
            v,
            score_mod=softcap,
            block_mask=mask,
            scale=HEAD_DIM**-0.5,
            enable_gqa=True,
            kernel_options=options,
        )

    def forward_backward() -> None:
        forward().backward(grad)

    began = time.perf_counter()
    forward_backward()  # the compile of both
    compile_s = time.perf_counter() - began
    both = time_calls(forward_backward, repeats)
    fwd = time_calls(forward, repeats)
    return {
        "forward_ms": fwd,
        "backward_ms": both - fwd,
        "step_ms": 2 * fwd + (both - fwd),
        "compile_s": compile_s,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--length", type=int, default=15360, help="real tokens in the row (bench: 14,000-16,400)"
    )
    parser.add_argument("--median", type=float, default=240.0, help="median example length")
    parser.add_argument(
        "--block", type=int, default=64, help="the block mask's block size (model.flex_block_size)"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--autotune", action="store_true", help="also time Inductor's max-autotune choice")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    lengths = example_lengths(args.length, args.median, 0.9, seed=0)
    mask = row_mask(lengths, args.block, "cuda")
    log.info(
        "row of %d tokens, %d examples, %d-position blocks, sparsity %.1f%%",
        args.length,
        len(lengths),
        args.block,
        mask.sparsity(),
    )
    rows: list[dict[str, Any]] = []

    def record(name: str, options: dict[str, int] | None, mode: str | None = None) -> None:
        try:
            row = {
                "name": name,
                "options": options,
                **measure(options, mode, mask, args.length, args.repeats),
            }
        except Exception as error:  # a tile set that does not fit this GPU's shared memory
            row = {"name": name, "options": options, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        rows.append(row)
        log.info("%s", json.dumps(row))
        args.out.write_text(
            json.dumps({"lengths": len(lengths), "block": args.block, "rows": rows}, indent=1)
        )

    record("default", None)
    for m, n, stages, warps in FORWARD_TILES:
        record(
            f"fwd {m}x{n} s{stages} w{warps}",
            {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_stages": stages, "fwd_num_warps": warps},
        )
    for m1, n1, m2, n2, stages, warps in BACKWARD_TILES:
        options = {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2}
        record(
            f"bwd {m1}/{n1}/{m2}/{n2} s{stages} w{warps}",
            {**options, "bwd_num_stages": stages, "bwd_num_warps": warps},
        )
    if args.autotune:
        record("max-autotune", None, mode="max-autotune-no-cudagraphs")
    ok = [r for r in rows if "error" not in r]
    best_fwd = min((r for r in ok if r["name"].startswith(("fwd", "default"))), key=lambda r: r["forward_ms"])
    best_bwd = min(
        (r for r in ok if r["name"].startswith(("bwd", "default"))), key=lambda r: r["backward_ms"]
    )
    combined = {**(best_fwd["options"] or {}), **(best_bwd["options"] or {})}
    if combined:
        record("best fwd + best bwd", combined)
        record("best fwd + best bwd, TMA", {**combined, "USE_TMA": True})
    default = rows[0]
    print(
        f"{'tiles':<32} {'fwd ms':>8} {'bwd ms':>8} {'2 fwd + bwd':>12} {'vs default':>10} {'compile s':>9}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<32} {r['error'][:80]}")
            continue
        print(
            f"{r['name']:<32} {r['forward_ms']:8.3f} {r['backward_ms']:8.3f} {r['step_ms']:12.3f} "
            f"{default['step_ms'] / r['step_ms']:9.2f}x {r['compile_s']:9.1f}"
        )


if __name__ == "__main__":
    main()
