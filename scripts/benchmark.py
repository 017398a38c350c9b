#!/usr/bin/env python3
"""Training, loading and inference throughput: pneumo's pipeline against a typical PyTorch one, and
against the machine's arithmetic peak.

    python scripts/benchmark.py [--data ROOT] [--device cpu|cuda] [--quick] [--repeats N] [--busy N] [--json FILE]

Without --data it writes synthetic X-rays as JPEG files into a temporary Kermany-style folder, so
both pipelines read the same files from disk. Each pipeline runs in a process of its own.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pneumo.core.config import load_config
from pneumo.core.device import resolve_device
from pneumo.data.synthetic import write_folder
from pneumo.model.network import build_model

# The pipelines are no part of the installed package: they live in benchmarks/, beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.pipelines import (
    Settings,
    busy_processes,
    cpu_peak,
    default_workers,
    gpu_peak_tflops,
    matmul_gflops,
    run_isolated,
)

RATES = (("train_images_per_s", "train"), ("load_images_per_s", "load"), ("infer_images_per_s", "inference"))


def limits(report: dict, model, size: int, device: torch.device, cpu_ghz: float | None) -> dict:
    """FLOPs per image and the achieved rates as a share of the hardware's peak, and of what torch's dense
    matrix product reaches on it."""
    train_flops, infer_flops = model.flops_per_image(size), model.flops_per_image(size, training=False)
    out = {"train_gflops_per_image": train_flops / 1e9, "infer_gflops_per_image": infer_flops / 1e9}
    achieved = {
        "train": report["pneumo"]["train_images_per_s"] * train_flops / 1e9,
        "infer": report["pneumo"]["infer_images_per_s"] * infer_flops / 1e9,
        "typical_train": report["typical"]["train_images_per_s"] * train_flops / 1e9,
    }
    if device.type == "cuda":
        peak, what = (gpu_peak_tflops(device) or 0) * 1e3, "dense bf16 tensor cores"
    else:
        p = cpu_peak()
        if cpu_ghz:
            p = replace(p, ghz=cpu_ghz, clock_source="clock given with --cpu-ghz")
        amx = report["pneumo"]["train_dtype"] == "bfloat16" and p.bf16_amx_gflops
        peak, what = (
            (p.bf16_amx_gflops if amx else p.fp32_gflops),
            ("AMX bf16: " if amx else "float32 FMA: ") + p.assumptions(),
        )
        out["cpu"] = p.cpu
    out.update({f"{k}_gflops_per_s": v for k, v in achieved.items()})
    dtype = getattr(torch, report["pneumo"]["train_dtype"])
    matmul = out["matmul_gflops_per_s"] = matmul_gflops(device, dtype)
    out["matmul"] = f"torch.mm of two 2048 x 2048 {report['pneumo']['train_dtype']} matrices"
    out.update({f"{k}_share_of_matmul": v / matmul for k, v in achieved.items()})
    if peak:
        out.update({f"{k}_share_of_peak": v / peak for k, v in achieved.items()}, peak_gflops_per_s=peak, peak=what)
    return out


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
    parser.add_argument("--quick", action="store_true", help="256 synthetic images: a minute or two on 2 CPU cores")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed epochs per pipeline, median reported (default: 3 synthetic, 1 with --data)",
    )
    parser.add_argument(
        "--busy", type=int, default=0, help="busy processes to run beside both pipelines, as on a shared machine"
    )
    parser.add_argument(
        "--cpu-ghz", type=float, help="the clock for the CPU's peak, if turbo runs above what it reports"
    )
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.busy < 0:
        parser.error("--busy must be 0 or more")

    cfg = load_config(args.config)
    size, device = cfg.data.image_size, resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "xray"
        if not args.data:
            write_folder(root, {"train": 256 if args.quick else args.images}, size, suffix=".jpeg")
        settings = Settings(
            str(root),
            size,
            cfg.model.channels,
            cfg.model.stem_stride,
            args.device,
            args.batch,
            args.workers,
            str(Path(tmp) / "cache"),
            cfg.train.precision,
            args.repeats if args.repeats is not None else 1 if args.data else 3,
        )
        with busy_processes(args.busy):
            report = {"pneumo": run_isolated("pneumo", settings), "typical": run_isolated("typical", settings)}
    report["ratio"] = {k: report["pneumo"][k] / report["typical"][k] for k, _ in RATES}
    report["limits"] = limits(report, build_model(cfg.model), size, device, args.cpu_ghz)
    report["device"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    report["settings"] = {**asdict(settings), "data": args.data or "synthetic JPEG", "torch": torch.__version__}
    report["settings"]["busy"] = args.busy
    print_report(report, size, args.batch)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict, size: int, batch: int) -> None:
    p, lim = report["pneumo"], report["limits"]
    print(
        f"{report['device']}, {p['images']} images at {size}x{size}, batch {batch}, pneumo trains in {p['train_dtype']}"
        + (f", {report['settings']['busy']} busy processes beside" if report["settings"]["busy"] else "")
    )
    print(f"{'images/s':<12} {'pneumo':>10} {'typical':>10} {'ratio':>7}")
    for key, name in RATES:
        print(f"{name:<12} {p[key]:10.1f} {report['typical'][key]:10.1f} {report['ratio'][key]:7.2f}")
    print(f"pneumo spent {100 * p['data_wait_fraction']:.1f}% of its training time preparing batches")
    print(f"pneumo's OMP_WAIT_POLICY: {p['openmp_wait']} (PASSIVE where the machine was busy as it started)")
    print(
        f"FLOPs per image: {lim['train_gflops_per_image']:.2f} G training, "
        f"{lim['infer_gflops_per_image']:.2f} G inference"
    )
    print(
        f"share of what {lim['matmul']} reaches here ({lim['matmul_gflops_per_s']:.0f} GFLOP/s): training "
        f"{100 * lim['train_share_of_matmul']:.0f}% (typical {100 * lim['typical_train_share_of_matmul']:.0f}%), "
        f"inference {100 * lim['infer_share_of_matmul']:.0f}%"
    )
    if "peak" in lim:
        print(
            f"share of peak ({lim['peak_gflops_per_s']:.0f} GFLOP/s, {lim['peak']}): training "
            f"{100 * lim['train_share_of_peak']:.0f}% (typical {100 * lim['typical_train_share_of_peak']:.0f}%), "
            f"inference {100 * lim['infer_share_of_peak']:.0f}%"
        )


if __name__ == "__main__":
    sys.exit(main())
