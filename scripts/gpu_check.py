#!/usr/bin/env python3
"""Prove pneumo's GPU path on a machine that has one: one command, one summary, one JSON file.

    python scripts/gpu_check.py [--data KERMANY_ROOT] [--json gpu_check.json] [--epochs 3]

The checks, each timed: the test suite's GPU tests (`pytest -m gpu`); the recipe (configs/kermany.yaml,
one network) for --epochs epochs on one GPU, with its images/s, the share of step time spent waiting
for data, peak GPU memory and the share of the GPU's bf16 peak; that checkpoint evaluated on the GPU
and on the CPU (probabilities within 1e-3); a run stopped after --epochs - 1 epochs and resumed,
against the uninterrupted one; torchrun on every GPU against one (when there are several); and
scripts/benchmark.py against the typical pipeline. Without --data, synthetic X-rays of the Kermany
split's size stand in. Without a CUDA GPU it says so in one line and exits 2; --smoke-on-cpu runs the
same steps at toy size on the CPU instead, to check this script itself (the tests do). Exit 0: every
check ran and met its goal; 1: some did not (the summary says which).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is no part of the installed package
from benchmarks.pipelines import gpu_peak_tflops  # noqa: E402
from pneumo.core.config import Config, load_config  # noqa: E402
from pneumo.model.checkpoint import TrainedModel  # noqa: E402
from pneumo.model.network import build_model  # noqa: E402

# The goals of the GPU path (docs/performance.md): against the typical pipeline, waiting for data, the
# share of the GPU's bf16 peak, several GPUs against one, GPU against CPU.
GOALS = {"vs_typical": 10.0, "data_wait": 0.05, "share_of_peak": 0.40, "multi_gpu": 1.7, "agreement": 1e-3}


def settings(args, out: Path) -> list[str]:
    """The shipped recipe, one network, on the GPU (or, smoking on the CPU, at toy size), as --set items."""
    sets = [f"output.dir={out}", f"train.epochs={args.epochs}", "train.members=1", "train.patience=0"]
    sets += [f"data.cache_dir={args.tmp / 'cache'}", "device=cpu" if args.smoke_on_cpu else "device=cuda"]
    if args.data:
        sets += [f"data.root={args.data}"]
    else:
        sets += ["data.format=synthetic", "data.synthetic.n_train=4432", "data.synthetic.n_val=784"]
    if args.smoke_on_cpu:  # later items win: these replace the full-size ones
        sets += ["data.format=synthetic", "data.image_size=48", "data.synthetic.n_train=480"]
        sets += ["data.synthetic.n_val=64", "model.channels=[8, 16]", "model.stem_stride=1", "train.batch_size=16"]
    return sets


def recipe(args, out: Path) -> Config:
    return load_config(ROOT / "configs" / "kermany.yaml", settings(args, out))


def train_command(args, run: Path, extra: list[str] = (), launcher: list[str] | None = None) -> list[str]:
    """pneumo-train on the recipe into `run` as a process of its own (under `launcher`, e.g. torchrun)."""
    launcher = launcher or [str(ROOT / "scripts" / "train.py")]
    sets = [f"--set={s}" for s in [*settings(args, run), *extra]]
    return [sys.executable, *launcher, "--config", str(ROOT / "configs" / "kermany.yaml"), *sets]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_tests(args) -> dict:
    if args.smoke_on_cpu:
        return {"ok": True, "skipped": "smoke run on the CPU"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")],
        text=True,
        capture_output=True,
        cwd=ROOT,
    )
    return {"ok": result.returncode == 0, "last_line": (result.stdout.strip().splitlines() or [""])[-1]}


def check_recipe(args) -> dict:
    from pneumo.train.run import train

    cfg = recipe(args, args.tmp / "recipe")
    if not args.smoke_on_cpu:
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    last = history(args.tmp / "recipe")[-1]
    flops = build_model(cfg.model).flops_per_image(cfg.data.image_size)
    peak = None if args.smoke_on_cpu else gpu_peak_tflops(torch.device("cuda"))
    share = last["train_images_per_s"] * flops / (peak * 1e12) if peak else None
    result = {
        "train_images_per_s": last["train_images_per_s"],
        "data_wait_fraction": last["data_wait_fraction"],
        "peak_gpu_memory_gib": None if args.smoke_on_cpu else torch.cuda.max_memory_allocated() / 2**30,
        "share_of_bf16_peak": share,
        "val_auc": last.get("val_auc"),
    }
    result["ok"] = last["data_wait_fraction"] < GOALS["data_wait"] and (
        share is None or share >= GOALS["share_of_peak"]
    )
    return result


def check_agreement(args) -> dict:
    from pneumo.data import load_split

    model = TrainedModel.load(args.tmp / "recipe" / "best.pt")
    images = load_split(recipe(args, args.tmp / "recipe"), "val").images
    device = torch.device("cpu") if args.smoke_on_cpu else torch.device("cuda")
    on_gpu = torch.sigmoid(torch.from_numpy(model.logits(images, device))).numpy()
    on_cpu = torch.sigmoid(torch.from_numpy(model.logits(images, torch.device("cpu")))).numpy()
    diff = float(np.abs(on_gpu - on_cpu).max())
    return {"max_probability_difference": diff, "ok": diff <= GOALS["agreement"]}


def check_resume(args) -> dict:
    """The recipe run again, killed (SIGKILL) once its first epoch is written, then --resume: its epochs
    against the uninterrupted run's."""
    run = args.tmp / "resumed"
    command = train_command(args, run)
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    while proc.poll() is None and not ((run / "metrics.jsonl").exists() and history(run)):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stopped = len(history(run))
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if resumed.returncode != 0:
        return {"ok": False, "error": resumed.stderr[-2000:]}
    ours, whole = history(run), history(args.tmp / "recipe")
    diff = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(ours, whole, strict=True))
    # Exact on a CPU; on a GPU some kernels add in scheduling order, so up to rounding (docs/commands.md).
    ok = stopped < args.epochs and len(ours) == args.epochs and diff < (1e-12 if args.smoke_on_cpu else 1e-2)
    return {"killed_after_epoch": stopped, "max_train_loss_difference": diff, "ok": ok}


def check_multi_gpu(args) -> dict:
    n = 0 if args.smoke_on_cpu else torch.cuda.device_count()
    if n < 2:
        return {"ok": True, "skipped": f"{n or 'no'} GPU" + ("s" if n != 1 else "")}
    # The recipe run's own settings and data on every GPU, for two epochs: its second against the
    # one-GPU run's last, both past the first epoch's warm-up.
    torchrun = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        str(ROOT / "scripts" / "train.py"),
    ]
    command = train_command(args, args.tmp / "multi", extra=["train.epochs=2"], launcher=torchrun)
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return {"ok": False, "error": result.stderr[-2000:]}
    multi = history(args.tmp / "multi")[-1]["train_images_per_s"]
    single = history(args.tmp / "recipe")[-1]["train_images_per_s"]
    return {"gpus": n, "speedup": multi / single, "ok": multi / single >= GOALS["multi_gpu"]}


def check_benchmark(args) -> dict:
    if args.smoke_on_cpu:
        return {"ok": True, "skipped": "smoke run on the CPU"}
    out = args.tmp / "benchmark.json"
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", "cuda", "--json", str(out)]
    result = subprocess.run(command + (["--data", str(args.data)] if args.data else []), capture_output=True, text=True)
    if result.returncode != 0:
        return {"ok": False, "error": result.stderr[-2000:]}
    ratio = json.loads(out.read_text())["ratio"]
    return {**ratio, "ok": ratio["train_images_per_s"] >= GOALS["vs_typical"]}


CHECKS = [
    ("GPU tests", check_tests),
    ("recipe", check_recipe),
    ("GPU against CPU", check_agreement),
    ("resume", check_resume),
    ("several GPUs", check_multi_gpu),
    ("benchmark", check_benchmark),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a Kermany-style folder (default: synthetic X-rays of its size)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where the report goes")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the recipe run (at least 2)")
    parser.add_argument("--smoke-on-cpu", action="store_true", help="the same steps on the CPU at toy size")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (one run is stopped an epoch early and resumed)")
    if not (torch.cuda.is_available() or args.smoke_on_cpu):
        print(
            f"gpu_check: no CUDA GPU here (torch {torch.__version__} sees none); run it on a machine with one",
            file=sys.stderr,
        )
        return 2
    device = "cpu (smoke run)" if args.smoke_on_cpu else torch.cuda.get_device_name(0)
    report = {"device": device, "torch": torch.__version__, "goals": GOALS, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        for name, check in CHECKS:
            start = time.perf_counter()
            try:
                result = check(args)
            except Exception as e:  # noqa: BLE001 (a failed check is reported, and the others still run)
                result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:1000]}"}
            result["seconds"] = round(time.perf_counter() - start, 1)
            report["checks"][name] = result
            figures = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in result.items()
                if k not in ("ok", "error")
            )
            print(
                f"{'ok  ' if result['ok'] else 'FAIL'} {name}: {figures}"
                + (f"; {result['error']}" if "error" in result else ""),
                flush=True,
            )
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [name for name, r in report["checks"].items() if not r["ok"]]
    print(
        f"gpu_check on {device}: {len(CHECKS) - len(failed)} of {len(CHECKS)} checks met their goals"
        + (f"; not: {', '.join(failed)}" if failed else "")
        + f"; report in {args.json}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
