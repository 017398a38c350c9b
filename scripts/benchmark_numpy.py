#!/usr/bin/env python3
"""Forward pass of the production CNN, NumPy reference vs torch on the CPU, for one batch.

    python scripts/benchmark_numpy.py [--config configs/kermany.yaml] [--batch 32] [--repeats 20] [--json FILE]

Times the best of `repeats` runs (after a warm-up) of: torch as pneumo runs it on a CPU (eval,
no_grad, float32, channels_last), torch in plain NCHW, and the NumPy network in float32 and float64.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from pneumo import reference as numpy_nn
from pneumo.core.config import load_config
from pneumo.core.device import prepare, to_input
from pneumo.model.network import INPUT_MEAN, INPUT_STD, build_model


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="configs/kermany.yaml", help="the model section of this config is benchmarked"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    cfg = load_config(args.config)
    size = cfg.data.image_size
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size), dtype=np.uint8)
    cpu = torch.device("cpu")

    results = {}
    with torch.no_grad():
        production = prepare(build_model(cfg.model).eval(), cpu)
        production.load_state_dict(model.state_dict())
        x_cl = to_input(torch.from_numpy(images), cpu)
        results["torch_channels_last_f32"] = best_time(lambda: production(x_cl), args.repeats)
        x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
        results["torch_nchw_f32"] = best_time(lambda: model(x), args.repeats)
    for name, dtype in (("numpy_f32", np.float32), ("numpy_f64", np.float64)):
        net = numpy_nn.SmallCNN(
            cfg.model.channels, cfg.model.stem_stride, cfg.model.dropout, INPUT_MEAN, INPUT_STD, dtype=dtype
        )
        net.load_state_dict(state)
        net.eval()
        xn = images[:, None].astype(dtype) / 255
        results[name] = best_time(lambda net=net, xn=xn: net.forward(xn), args.repeats)

    reference = results["torch_channels_last_f32"]
    print(
        f"forward of {args.batch} images at {size}x{size}, channels {cfg.model.channels}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'':26} {'ms':>8} {'x torch':>8}")
    for name, seconds in results.items():
        print(f"{name:26} {seconds * 1000:8.1f} {seconds / reference:8.2f}")
    if args.json:
        report = {
            "batch": args.batch,
            "image_size": size,
            "channels": cfg.model.channels,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "seconds": results,
            "ratio_numpy_f32_to_torch": results["numpy_f32"] / reference,
            "ratio_numpy_f64_to_torch": results["numpy_f64"] / reference,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
