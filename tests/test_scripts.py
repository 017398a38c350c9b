import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script
from pneumo.data.synthetic import make_split


def test_numpy_benchmark_reports_every_backend(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark_numpy.py"),
            "--batch",
            "2",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["seconds"]) == {"torch_channels_last_f32", "torch_nchw_f32", "numpy_f32", "numpy_f64"}
    assert all(t > 0 for t in report["seconds"].values())
    assert "numpy_f32" in result.stdout


def test_pipeline_benchmark_reports_both_pipelines(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("data:\n  image_size: 32\nmodel:\n  channels: [8, 16]\n  stem_stride: 1\n")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "--config",
            str(cfg),
            "--images",
            "64",
            "--batch",
            "16",
            "--workers",
            "1",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "b.json").read_text())
    keys = {"train_images_per_s", "load_images_per_s", "infer_images_per_s"}
    assert keys <= set(report["pneumo"]) and keys <= set(report["typical"])
    assert report["pneumo"]["images"] == report["typical"]["images"] == 64
    assert all(report["ratio"][k] > 0 for k in keys)
    assert 0 <= report["pneumo"]["data_wait_fraction"] < 1
    # PASSIVE where the machine was busy; a policy the environment names stands
    assert report["pneumo"]["openmp_wait"] in ("PASSIVE", "unset", os.environ.get("OMP_WAIT_POLICY"))
    limits = report["limits"]
    assert limits["train_gflops_per_image"] == 3 * limits["infer_gflops_per_image"] > 0
    assert 0 < limits["train_share_of_peak"] and "float32 lanes" in limits["peak"]
    # Measured against torch's own matrix product on this machine, in the dtype pneumo trained in.
    assert limits["matmul_gflops_per_s"] > 0 and "float32" in limits["matmul"]
    assert limits["train_share_of_matmul"] == limits["train_gflops_per_s"] / limits["matmul_gflops_per_s"]
    assert "share of what torch.mm" in result.stdout
    assert report["device"].startswith("cpu") and report["settings"]["size"] == 32
    assert report["settings"]["repeats"] == 3  # synthetic images: the median of three epochs
    assert "train" in result.stdout and "ratio" in result.stdout


def test_shortcut_check_reports_each_condition_or_fails_cleanly(tmp_path, trained_checkpoint):
    result = run_script("shortcut_check.py", "--checkpoint", trained_checkpoint)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line[:24].strip(): line.split()[-4:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"as is", "shapes swapped", "NORMAL detail lowered", "corners blanked"}
    assert all(0 <= float(v) <= 1 for values in rows.values() for v in values)

    bad = run_script("shortcut_check.py", "--checkpoint", tmp_path / "none.pt")
    assert (
        bad.returncode == 3
        and "none.pt does not exist" in bad.stderr
        and "Traceback" not in bad.stderr
        and not bad.stdout
    )


def test_step_profile_runs_each_variant(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("data:\n  image_size: 32\nmodel:\n  channels: [8, 16]\n  stem_stride: 1\n")
    tables = {}
    for variant in ("pneumo", "unfused", "bf16"):
        args = ["--config", str(cfg), "--batch", "4", "--steps", "1", "--variant", variant, "--table", "40"]
        result = run_script("profile_step.py", *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{variant}: ") and "images/s" in result.stdout
        assert "Self CPU" in result.stdout  # the operator table
        tables[variant] = result.stdout
    # pneumo's step runs the fused blocks; unfused (and bf16 autocast, which they do not cover) torch's modules
    assert "_BnPoolRelu" in tables["pneumo"] and "native_batch_norm" not in tables["pneumo"]
    assert all("native_batch_norm" in tables[v] and "_BnPoolRelu" not in tables[v] for v in ("unfused", "bf16"))


def test_pipeline_benchmark_refuses_fewer_than_one_repeat():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--repeats", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--repeats must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a machine without CUDA")
def test_gpu_check_says_in_one_line_when_there_is_no_gpu(tmp_path):
    result = run_script("gpu_check.py", "--json", tmp_path / "g.json")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no CUDA GPU" in result.stderr
    assert not (tmp_path / "g.json").exists()


def test_gpu_check_runs_its_steps_on_the_cpu_at_toy_size(tmp_path):
    """The script's own logic, on the CPU: every check runs and reports; the GPU-only ones say they were
    skipped, and the recipe's data-wait goal (meant for a GPU) is judged like the rest."""
    result = run_script("gpu_check.py", "--smoke-on-cpu", "--json", tmp_path / "g.json", timeout=300)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads((tmp_path / "g.json").read_text())
    checks = report["checks"]
    assert list(checks) == ["GPU tests", "recipe", "GPU against CPU", "resume", "several GPUs", "benchmark"]
    assert checks["GPU against CPU"]["ok"] and checks["GPU against CPU"]["max_probability_difference"] == 0
    assert checks["resume"]["ok"] and checks["resume"]["killed_after_epoch"] < 3
    assert checks["recipe"]["train_images_per_s"] > 0 and 0 <= checks["recipe"]["data_wait_fraction"] < 1
    assert "checks met their goals" in result.stdout.splitlines()[-1]


def test_model_comparison_gives_each_figure_of_each_checkpoint(tmp_path, trained_checkpoint):
    images, labels = make_split("test", 40, 32, 0.5, seed=3)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "site" / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"IM-{i:04d}_x.png")
    for first_network in (False, True):
        args = ["--site", tmp_path / "site", "--out", tmp_path / "c.json", trained_checkpoint]
        result = run_script("compare_models.py", *args, *(["--first-network"] if first_network else []))
        assert result.returncode == 0, result.stderr[-2000:]
        (row,) = json.loads((tmp_path / "c.json").read_text()).values()
        aucs = ["val", "design_mean", "design_worst", "held_out_mean", "held_out_worst", "site", "site_equal_grey"]
        assert all(0 <= row[k] <= 1 for k in aucs) and row["per_image"] == "none"
        assert (row["site_flagged"] is None) == first_network


def test_ood_study_gives_each_descriptor_and_combination_at_each_quantile(tmp_path, trained_checkpoint):
    same, _ = make_split("test", 20, 32, 0.5, seed=5)
    noise = np.random.default_rng(0).integers(0, 256, (10, 32, 32), dtype=np.uint8)
    for name, images in (("same", same), ("noise", noise)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
    args = ["--checkpoint", trained_checkpoint, "--json", tmp_path / "o.json", "--quantile", "0.9"]
    result = run_script("ood_study.py", *args, tmp_path / "same", tmp_path / "noise")
    assert result.returncode == 0, result.stderr[-2000:]
    flagged = json.loads((tmp_path / "o.json").read_text())["flagged"]
    descriptors = ("features", "thumbnail", "histogram", "texture", "the three", "the four")
    assert list(flagged) == [f"{c} at 0.9" for c in descriptors]
    four = flagged["the four at 0.9"]
    assert four[str(tmp_path / "noise")] == 1.0 and four[str(tmp_path / "same")] <= 0.3
    assert all(0 <= v <= 1 for row in flagged.values() for v in row.values())
    args[args.index("--json") + 1] = tmp_path / "scales.json"
    result = run_script("ood_study.py", *args, "--texture-scales", "1,2", tmp_path / "noise")
    assert result.returncode == 0, result.stderr[-2000:]
    study = json.loads((tmp_path / "scales.json").read_text())
    assert study["texture_scales"] == [1, 2] and study["flagged"]["texture at 0.9"][str(tmp_path / "noise")] == 1.0
