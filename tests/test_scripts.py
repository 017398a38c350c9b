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
