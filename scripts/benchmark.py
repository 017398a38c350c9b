#!/usr/bin/env python3
"""Training, loading and inference throughput: pneumo's pipeline against a typical PyTorch one.

    python scripts/benchmark.py [--data ROOT] [--device cpu|cuda] [--quick] [--json FILE]

Without --data it writes synthetic X-rays as JPEG files into a temporary Kermany-style folder, so
both pipelines read the same files from disk.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from pneumo.benchmark import bench_pneumo, bench_typical, default_workers, model_flops_per_image, peak_bf16_tflops
from pneumo.config import load_config
from pneumo.data.synthetic import write_folder
from pneumo.device import resolve_device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/kermany.yaml", help="model and image size come from here")
    parser.add_argument("--data", help="a Kermany-style folder (its train split is used); default: synthetic JPEGs")
    parser.add_argument("--images", type=int, default=1024, help="synthetic images to write (default 1024)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="DataLoader workers of the typical pipeline"
    )
    parser.add_argument("--quick", action="store_true", help="256 synthetic images: about a minute on 2 CPU cores")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    cfg = load_config(args.config)
    size, device = cfg.data.image_size, resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "xray"
        if not args.data:
            write_folder(root, {"train": 256 if args.quick else args.images}, size, suffix=".jpeg")
        pneumo = bench_pneumo(root, size, cfg.model, device, args.batch, Path(tmp) / "cache", cfg.train.precision)
        typical = bench_typical(root, size, cfg.model, device, args.batch, args.workers)

    report = {
        "pneumo": pneumo,
        "typical": typical,
        "ratio": {k: pneumo[k] / typical[k] for k in ("train_images_per_s", "load_images_per_s", "infer_images_per_s")},
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "settings": {
            "image_size": size,
            "channels": cfg.model.channels,
            "batch": args.batch,
            "workers": args.workers,
            "images": pneumo["images"],
            "data": args.data or "synthetic JPEG",
            "torch": torch.__version__,
        },
    }
    peak = peak_bf16_tflops(device)
    if peak:
        achieved = pneumo["train_images_per_s"] * model_flops_per_image(cfg.model, size) / 1e12
        report["pneumo"]["train_tflops"] = achieved
        report["pneumo"]["fraction_of_bf16_peak"] = achieved / peak

    print(
        f"{report['device']}, {pneumo['images']} images at {size}x{size}, batch {args.batch}, pneumo "
        f"trains in {pneumo['train_dtype']}"
    )
    print(f"{'images/s':<12} {'pneumo':>10} {'typical':>10} {'ratio':>7}")
    for key, name in (
        ("train_images_per_s", "train"),
        ("load_images_per_s", "load"),
        ("infer_images_per_s", "inference"),
    ):
        print(f"{name:<12} {pneumo[key]:10.1f} {typical[key]:10.1f} {report['ratio'][key]:7.2f}")
    print(f"pneumo spent {100 * pneumo['data_wait_fraction']:.1f}% of its training time preparing batches")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
