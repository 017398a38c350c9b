import torch

from benchmarks.pipelines import AsWritten
from pneumo.model.network import SmallCNN


def test_the_typical_pipelines_network_computes_the_same_function():
    model = SmallCNN([8, 16], stem_stride=2)
    with torch.no_grad():
        for bn in (model.features[1], model.features[5]):  # BatchNorms with non-trivial statistics and scales
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.weight.uniform_(-1, 1)
    model.eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(AsWritten(model)(x), model(x), atol=1e-6)
    # The typical network runs its ReLU before its pooling, in its module order.
    order = [type(m).__name__ for m in AsWritten(model).features[:4]]
    assert order == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]


def test_the_median_run_is_reported_with_its_own_result(monkeypatch):
    import benchmarks.pipelines as benchmark

    runs = iter([(3.0, "slow"), (1.0, "fast"), (2.0, "middle")])
    monkeypatch.setattr(benchmark, "_timed", lambda device, work: next(runs))
    assert benchmark._median_timed(torch.device("cpu"), None, 3) == (2.0, "middle")
    once = iter([(5.0, "only")])
    monkeypatch.setattr(benchmark, "_timed", lambda device, work: next(once))
    assert benchmark._median_timed(torch.device("cpu"), None, 1) == (5.0, "only")


def test_a_gpus_peak_is_found_by_its_whole_name(monkeypatch):
    from benchmarks.pipelines import gpu_peak_tflops

    for name, tflops in (
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA A10G", 70.0),
        ("Tesla T4", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu_peak_tflops(torch.device("cuda")) == tflops, name


def test_busy_processes_run_beside_the_block_and_end_with_it():
    import os

    from benchmarks.pipelines import busy_processes

    with busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        pids = [p.pid for p in procs]
    assert all(p.poll() is not None for p in procs)
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"busy process {pid} outlived the block")


def test_the_pneumo_pipeline_starts_as_pneumo_train_does_and_the_typical_one_with_openmps_default(monkeypatch):
    """On a busy machine pneumo's process gets sleeping OpenMP threads, as pneumo-train gives itself;
    the typical pipeline's keeps whatever the user's environment says."""
    import subprocess

    from benchmarks import pipelines

    seen = {}

    def run(command, env, **kwargs):
        seen[command[2]] = env.get("OMP_WAIT_POLICY")
        return subprocess.CompletedProcess(command, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(subprocess, "run", run)
    settings = pipelines.Settings("root", 32, [8], 1, "cpu", 8, 0, "cache", "auto", 1)
    for busy, expected in ((True, "PASSIVE"), (False, None)):
        monkeypatch.setattr(pipelines, "busy_now", lambda busy=busy: busy)
        assert pipelines.run_isolated("pneumo", settings) == pipelines.run_isolated("typical", settings) == {"ok": 1}
        assert seen == {"pneumo": expected, "typical": None}
