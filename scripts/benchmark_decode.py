#!/usr/bin/env python3
"""pneumo-predict on original-size JPEGs against one Pillow thread decoding and resizing the same files.

    python scripts/benchmark_decode.py FOLDER [--copies 3] [--checkpoint PATH] [--busy N] [--json FILE]

The files of FOLDER (searched recursively) are copied `--copies` times into a temporary folder, so
that a hundred files make a few hundred. Both then read the same files: first the plain loop (open,
grayscale, bilinear resize to 224x224), then `pneumo-predict` in a process of its own, whose summary
line gives its images/s and whose peak memory is read from the kernel.
"""

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# The busy processes come with the benchmark's pipelines, in benchmarks/ beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.pipelines import busy_processes


def pillow_loop(files: list[Path], size: int = 224) -> float:
    start = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    return len(files) / (time.perf_counter() - start)


def run_predict(files: list[Path], tmp: Path, checkpoint: str | None) -> subprocess.CompletedProcess:
    """pneumo-predict on the files' folder, in a process of its own, as a scheduled job runs it."""
    command = [sys.executable, "-m", "pneumo", "predict", "--out", str(tmp / "scores.csv"), str(files[0].parent)]
    command += ["--checkpoint", checkpoint] if checkpoint else []
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--busy", type=int, default=0, help="busy processes beside both, as on a shared machine")
    args = parser.parse_args()
    if args.busy < 0:
        parser.error("--busy must be 0 or more")

    originals = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k in range(args.copies):
            for i, f in enumerate(originals):
                files.append(Path(tmp) / "in" / f"{k}-{i:05d}{f.suffix}")
                files[-1].parent.mkdir(exist_ok=True)
                shutil.copyfile(f, files[-1])
        pillow_loop(files[:20])  # warm the page cache and Pillow
        with busy_processes(args.busy):
            pillow, result = pillow_loop(files), run_predict(files, Path(tmp), args.checkpoint)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return 1
    pneumo = float(re.search(r"\(([0-9.]+) images/s\)", result.stdout).group(1))
    report = {
        "files": len(files),
        "pillow_one_thread_images_per_s": pillow,
        "pneumo_predict_images_per_s": pneumo,
        "ratio": pneumo / pillow,
        "pneumo_predict_peak_mb": peak_mb,
        "busy": args.busy,
        "summary": result.stdout.strip(),
    }
    print(
        f"{len(files)} original-size JPEGs: one Pillow thread {pillow:.1f} images/s, pneumo-predict {pneumo:.1f} "
        f"images/s ({pneumo / pillow:.2f}x), peak memory {peak_mb:.0f} MB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
