"""Kernel-level timings behind ``--kernels fast``: linear layers and deformable attention.

    .venv/bin/python benchmarks/bench_kernels.py [--repeats 5] [--out kernels.md]

* linear: ``F.linear`` (the BLAS PyTorch was built with) against :func:`filo.kernels.linear`
  (oneDNN 1x1 convolution) for the layer shapes of ViT-L/14 at 518 px (1370 tokens), the CLIP
  text encoder on FiLo's prompts and the GroundingDINO encoder, in GFLOP/s.
* deformable attention: transformers' ``MultiScaleDeformableAttention`` against
  :class:`filo.detector.deform_attn.GatherDeformableAttention` for the Swin-T GroundingDINO
  encoder (5,684 queries, 4 levels, 8 heads, 4 points) and decoder (900 queries), in ms.

Each row also gives the largest difference of the two results. Ratios are measured in one run;
absolute numbers depend on the machine and its other load.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LINEAR_SHAPES = [  # (rows, in, out, what)
    (1370, 1024, 3072, "ViT-L qkv"),
    (1370, 1024, 1024, "ViT-L out_proj"),
    (1370, 1024, 4096, "ViT-L mlp c_fc"),
    (1370, 4096, 1024, "ViT-L mlp c_proj"),
    (528, 768, 3072, "text mlp c_fc (22 prompts x 24 tokens)"),
    (5684, 256, 2048, "GroundingDINO encoder ffn"),
    (5684, 256, 256, "GroundingDINO value_proj"),
]
LEVELS = [(65, 65), (33, 33), (17, 17), (9, 9)]  # Swin-T GroundingDINO at 518 x 518


def _time(fn, args: tuple, repeats: int) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


def linear_rows(repeats: int) -> list[str]:
    from filo import kernels

    lines = ["| layer | rows x in -> out | F.linear GFLOP/s | oneDNN GFLOP/s | ratio | max rel diff |",
             "|---|---|---:|---:|---:|---:|"]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, n_in, n_out, what in LINEAR_SHAPES:
            x = torch.randn(rows, n_in, generator=g)
            w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
            b = torch.randn(n_out, generator=g)
            t_blas = _time(F.linear, (x, w, b), repeats)
            t_dnn = _time(kernels.linear, (x, w, b), repeats)
            ref = F.linear(x, w, b)
            rel = float((kernels.linear(x, w, b) - ref).abs().max() / ref.abs().max())
            flops = 2 * rows * n_in * n_out
            lines.append(f"| {what} | {rows} x {n_in} -> {n_out} | {flops / t_blas / 1e9:.0f} | "
                         f"{flops / t_dnn / 1e9:.0f} | {t_blas / t_dnn:.2f}x | {rel:.1e} |")
    return lines


def deform_rows(repeats: int) -> list[str]:
    try:
        from transformers.models.grounding_dino.modeling_grounding_dino import (
            MultiScaleDeformableAttention,
        )
    except ImportError:
        return ["(transformers has no MultiScaleDeformableAttention module: skipped)"]
    from filo.detector.deform_attn import GatherDeformableAttention

    lines = ["| deformable attention | queries | transformers ms | gather ms | ratio | max abs diff |",
             "|---|---:|---:|---:|---:|---:|"]
    g = torch.Generator().manual_seed(1)
    heads, channels, points = 8, 32, 4
    shapes = torch.tensor(LEVELS)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([torch.zeros(1, dtype=torch.long), areas.cumsum(0)[:-1]])
    value = torch.randn(1, int(areas.sum()), heads, channels, generator=g)
    hf = MultiScaleDeformableAttention()
    fast = GatherDeformableAttention(hf)
    with torch.inference_mode():
        for queries, what in ((int(areas.sum()), "encoder layer"), (900, "decoder layer")):
            loc = torch.rand(1, queries, heads, len(LEVELS), points, 2, generator=g) * 1.1 - 0.05
            weights = torch.softmax(torch.randn(1, queries, heads, len(LEVELS) * points,
                                                generator=g), -1)
            weights = weights.view(1, queries, heads, len(LEVELS), points)
            args = (value, shapes, LEVELS, start, loc, weights, 64)
            t_hf = _time(hf, args, repeats)
            t_fast = _time(fast, args, repeats)
            diff = float((hf(*args) - fast(*args)).abs().max())
            lines.append(f"| {what} | {queries} | {t_hf * 1e3:.1f} | {t_fast * 1e3:.1f} | "
                         f"{t_hf / t_fast:.2f}x | {diff:.1e} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = "\n".join([f"### CPU kernels, {os.cpu_count()} CPU cores, torch {torch.__version__}", "",
                      *linear_rows(args.repeats), "", *deform_rows(args.repeats), ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
