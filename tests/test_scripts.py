import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_numpy_benchmark_reports_every_backend(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_numpy.py"), "--batch", "2", "--repeats", "1", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
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
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config", str(cfg), "--images", "64", "--batch", "16",
         "--workers", "1", "--device", "cpu", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "b.json").read_text())
    keys = {"train_images_per_s", "load_images_per_s", "infer_images_per_s"}
    assert keys <= set(report["pneumo"]) and keys <= set(report["typical"])
    assert report["pneumo"]["images"] == report["typical"]["images"] == 64
    assert all(report["ratio"][k] > 0 for k in keys)
    assert 0 <= report["pneumo"]["data_wait_fraction"] < 1
    assert report["device"].startswith("cpu") and report["settings"]["image_size"] == 32
    assert "train" in result.stdout and "ratio" in result.stdout
