#!/usr/bin/env python3
"""Where a training step of the recipe's model spends its time on this machine, and what the settings
pneumo chose (and the ones it left out) do to it: one synthetic batch, forward, backward and AdamW.

    python scripts/profile_step.py [--config configs/kermany.yaml] [--batch 32] [--steps 10]
        [--variant pneumo|unfused|direct|nchw|default-allocator|compile|bf16]

  pneumo             channels_last, glibc allocator tuned, float32, fused blocks, Winograd's
                     convolutions (what pneumo-train does without AMX)
  unfused            the same with torch's BatchNorm, max-pool and ReLU modules instead of the fused blocks
  direct             the same with torch's convolutions instead of Winograd's
  nchw               the same in the default NCHW layout
  default-allocator  glibc's default (large blocks mmapped and returned at every free)
  compile            torch.compile of the model (its compile time reported apart)
  bf16               bf16 autocast (what pneumo-train does with AMX)

Run each variant in a process of its own: the allocator setting cannot be undone within one.
"""

import argparse
import sys
import time

import torch
from torch import nn

from pneumo import cpu
from pneumo.core.config import load_config
from pneumo.core.device import autocast
from pneumo.core.process import tune_allocator
from pneumo.model.network import build_model

VARIANTS = ("pneumo", "unfused", "direct", "nchw", "default-allocator", "compile", "bf16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/kermany.yaml", help="model and image size come from here")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", choices=VARIANTS, default="pneumo")
    parser.add_argument("--table", type=int, default=12, help="rows of the operator table (0: none)")
    args = parser.parse_args()
    if args.variant != "default-allocator":
        tune_allocator()
    families = {"unfused": ["winograd"], "direct": ["fused"]}.get(args.variant, True)
    with cpu.kernels(families):
        return run(args)


def run(args) -> int:
    cfg = load_config(args.config)
    torch.manual_seed(0)
    layout = torch.contiguous_format if args.variant == "nchw" else torch.channels_last
    model = build_model(cfg.model).to(memory_format=layout)
    size = cfg.data.image_size
    x = torch.rand(args.batch, 1, size, size).contiguous(memory_format=layout)
    y = (torch.rand(args.batch) > 0.5).float()
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.01)
    loss_fn = nn.BCEWithLogitsLoss()
    forward = torch.compile(model) if args.variant == "compile" else model
    dtype = torch.bfloat16 if args.variant == "bf16" else torch.float32

    def step():
        with autocast(torch.device("cpu"), dtype):
            loss = loss_fn(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(
        f"{args.variant}: {1000 * seconds:.0f} ms/step, {args.batch / seconds:.1f} images/s "
        f"(batch {args.batch}, {torch.get_num_threads()} threads; first step {first:.1f} s)"
    )
    if args.table:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
