"""GPU energy over the measured window: NVML's energy counter, power samples where it is missing,
and "not measured" on the CPU. NVML is replaced by fakes whose draw is known."""

from __future__ import annotations

import time

import pytest

from bench.harness import monitor as monitor_mod
from bench.harness import report
from bench.harness.monitor import ResourceMonitor
from bench.harness.result import energy_fields, energy_line, load


class FakeNvml:
    """A GPU drawing ``watts`` from t0 on; ``counter=False``: a GPU without the energy counter."""

    class NVMLError(Exception):
        pass

    def __init__(self, watts: float, counter: bool = True):
        self.watts, self.counter, self.t0 = watts, counter, time.perf_counter()

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):  # noqa: N802 (NVML's names)
        if not self.counter:
            raise self.NVMLError("Not Supported")
        return int(5e6 + self.watts * (time.perf_counter() - self.t0) * 1e3)  # mJ since "driver load"

    def nvmlDeviceGetPowerUsage(self, handle):  # noqa: N802
        return int(self.watts * 1e3)  # mW

    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802
        return type("U", (), {"gpu": 90})()

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return type("M", (), {"used": 2**30})()


def _windows(mon: ResourceMonitor, spans: list[float], gap: float = 0.15) -> list[tuple[float, float]]:
    out = []
    for s in spans:
        t = time.perf_counter()
        time.sleep(s)
        out.append((t, time.perf_counter()))
        time.sleep(gap)  # between windows (evaluation, a checkpoint save): not counted
    return out


@pytest.mark.parametrize("counter", [True, False], ids=["energy-counter", "power-samples"])
def test_joules_over_the_measured_window_only(monkeypatch, counter):
    fake = FakeNvml(250.0, counter=counter)
    monkeypatch.setattr(monitor_mod, "_nvml_handle", lambda index: (fake, "gpu0"))
    mon = ResourceMonitor(interval=0.05, gpu_index=0).start()
    windows = _windows(mon, [0.4, 0.3])
    mon.stop()
    e = mon.energy(windows)
    seconds = sum(b - a for a, b in windows)
    assert e["measured"] and e["seconds"] == pytest.approx(seconds)
    assert e["joules"] == pytest.approx(250.0 * seconds, rel=0.03)  # the gaps are left out
    assert ("energy counter" in e["source"]) == counter and ("power" in e["source"]) != counter
    f = energy_fields(e, measured_images=700, epoch_images=1400)
    assert f["joules_per_1000_images"] == pytest.approx(e["joules"] / 700 * 1000)
    assert f["joules_per_epoch"] == pytest.approx(e["joules"] * 2)
    assert f["mean_watts"] == pytest.approx(250.0, rel=0.03)
    assert "J per 1,000 images" in energy_line(f)


def test_no_gpu_says_not_measured():
    mon = ResourceMonitor(interval=0.05).start()  # no GPU asked for: NVML is never touched
    windows = _windows(mon, [0.1])
    mon.stop()
    e = energy_fields(mon.energy(windows), measured_images=100, epoch_images=100)
    assert e == {"measured": False, "why": e["why"]} and "no GPU" in e["why"]
    assert energy_line(e).startswith("not measured")


@pytest.mark.slow
def test_a_cpu_run_records_energy_as_not_measured_and_renderers_say_so(small_data, tmp_path):
    from tests.conftest import bench

    out = tmp_path / "runs"
    common = ("--data", str(small_data), "--batch-size", "16", "--image-size", "48", "--steps", "6")
    common += ("--warmup-steps", "2", "--no-eval", "--out", str(out))
    for label in ("a", "b"):
        proc = bench(
            "run", "--loader", "synthetic", "--model", "small", "--label", label, *common, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        assert "GPU energy" in proc.stdout and "not measured" in proc.stdout
    results = report.results_in(out)
    assert len(results) == 2
    for r in results.values():
        assert r.metrics.energy["measured"] is False and r.metrics.joules_per_1000_images is None
        assert load(next(out.glob("*.json"))).metrics.energy["why"]
    readme = report.render(out).read_text()
    assert "GPU energy: not measured" in readme and "J / 1k images" in readme
    rows = report.compare(next(iter(sorted(out.glob("*.json")))), sorted(out.glob("*.json"))[1])
    joules = [r for r in rows if "joules" in r["metric"]]
    assert joules and joules[0]["a"] is None and joules[0]["ratio"] is None  # no ratio of guesses


def test_the_loop_reports_its_measured_window_as_intervals():
    """The energy is read over the same window the images/s is: the intervals add up to it."""
    import torch

    from bench.trainer import TrainConfig, measure
    from loaders import build_loader

    loader = build_loader(
        "synthetic", None, batch_size=4, image_size=16, device="cpu", num_samples=64, num_classes=4
    )
    out = measure(loader, TrainConfig(epochs=2, warmup_steps=3), torch.device("cpu"), log=lambda *a: None)
    assert len(out.windows) == 2  # one per epoch: time between epochs is not measured
    assert all(a < b for a, b in out.windows) and out.windows[0][1] <= out.windows[1][0]
    assert sum(b - a for a, b in out.windows) == pytest.approx(out.measured_seconds, rel=1e-6)


def test_profiled_steps_are_summarised_into_the_result():
    import torch

    from bench.trainer import TrainConfig, measure
    from bench.trainer.profile import line, summarise
    from loaders import build_loader

    loader = build_loader(
        "synthetic", None, batch_size=4, image_size=16, device="cpu", num_samples=64, num_classes=4
    )
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))

    def step(images, labels):
        return torch.nn.functional.cross_entropy(model(images), labels).detach()

    cfg = TrainConfig(epochs=1, warmup_steps=2, profile_steps=3)
    out = measure(loader, cfg, torch.device("cpu"), step=step, log=lambda *a: None)
    p = out.profile
    assert p["steps"] == 3 and not p["cuda"] and p["kernel_ms_per_step_by_stream"] == {}
    assert any(o["name"] == "aten::linear" for o in p["top_cpu_ops"])
    assert "3 steps on the CPU" in line(p)
    # the CUDA side, from events as kineto reports them: two streams, allocations and waits per step
    events = [
        {"name": "gemm", "device": "cuda", "stream": 7, "us": 3000.0},
        {"name": "nvjpeg_decode", "device": "cuda", "stream": 13, "us": 1000.0},
        {"name": "cudaMalloc", "device": "cpu", "stream": None, "us": 50.0},
        {"name": "cudaStreamSynchronize", "device": "cpu", "stream": None, "us": 400.0},
    ]
    s = summarise(events * 2, steps=2, cuda=True)
    assert s["kernel_ms_per_step_by_stream"] == {"7": 3.0, "13": 1.0}
    assert s["allocation_calls_per_step"] == {"cudaMalloc": 1.0}
    assert s["synchronisation_calls_per_step"] == {"cudaStreamSynchronize": 1.0}
    assert s["synchronisation_ms_per_step"] == pytest.approx(0.4)
    assert "stream 13: 1.0 ms" in line(s)
