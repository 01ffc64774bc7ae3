"""Resource sampling during a run: CPU utilisation and memory of this process and its children
(DataLoader workers, DALI/FFCV threads live in the process itself) through psutil, and GPU
utilisation, memory and energy through NVML (nvidia-ml-py) when there is a GPU.

Energy: NVML's total-energy counter (millijoules since the driver loaded; Volta and later) read
with every sample and interpolated at the measured window's ends; where a GPU has no counter, its
power draw sampled with the rest and integrated (trapezoids). No GPU: not measured, never guessed."""

from __future__ import annotations

import statistics
import threading
import time

import psutil

from .cpus import affinity_of_tree


def _nvml_handle(index: int):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no NVML library, no driver, no GPU: GPU figures are simply absent
        return None, None


class ResourceMonitor:
    """Samples every ``interval`` seconds on a daemon thread between ``start()`` and ``stop()``."""

    def __init__(self, interval: float = 0.5, gpu_index: int | None = None):
        self.interval = interval
        self.proc = psutil.Process()
        self.gpu_index = gpu_index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu_percent: list[float] = []  # this process + children, 100 = one core busy
        self.system_cpu_percent: list[float] = []  # whole machine, 100 = every core busy
        self.rss_main: list[int] = []
        self.rss_children: list[int] = []
        self.children_seen = 0
        self.gpu_util: list[float] = []
        self.gpu_mem: list[int] = []
        self.energy_mj: list[tuple[float, float]] = []  # (perf_counter, NVML total energy, mJ)
        self.power_mw: list[tuple[float, float]] = []  # (perf_counter, power draw, mW): no counter
        self._cpu_times: dict[int, float] = {}
        self.affinity: set[int] = set()  # every core any thread of the tree was allowed on
        self.affinity_processes = 0

    def _tree_cpu_seconds(self, children) -> float:
        total = 0.0
        for p in [self.proc, *children]:
            try:
                t = p.cpu_times()
                self._cpu_times[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # a finished worker keeps its last reading
        total = sum(self._cpu_times.values())
        return total

    def _sample(self, last: tuple[float, float]) -> tuple[float, float]:
        children = self.proc.children(recursive=True)
        self.children_seen = max(self.children_seen, len(children))
        now, cpu = time.perf_counter(), self._tree_cpu_seconds(children)
        if now > last[0]:
            self.cpu_percent.append(100.0 * (cpu - last[1]) / (now - last[0]))
        self.system_cpu_percent.append(psutil.cpu_percent(interval=None))
        seen = affinity_of_tree(self.proc)
        self.affinity.update(seen["cores"])
        self.affinity_processes = max(self.affinity_processes, seen["processes"])
        try:
            self.rss_main.append(self.proc.memory_info().rss)
        except psutil.Error:
            pass
        rss = 0
        for c in children:
            try:
                rss += c.memory_info().rss
            except psutil.Error:
                pass
        self.rss_children.append(rss)
        if self._nvml is not None:
            try:
                self.gpu_util.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._gpu).gpu))
                self.gpu_mem.append(int(self._nvml.nvmlDeviceGetMemoryInfo(self._gpu).used))
            except Exception:
                pass
            self._sample_energy()
        return now, cpu

    def _sample_energy(self) -> None:
        nv, t = self._nvml, time.perf_counter()
        if self._energy_counter:
            try:
                self.energy_mj.append((t, float(nv.nvmlDeviceGetTotalEnergyConsumption(self._gpu))))
                return
            except Exception:  # NVML_ERROR_NOT_SUPPORTED on pre-Volta GPUs: sample the power instead
                self._energy_counter, self.energy_mj = False, []
        try:
            self.power_mw.append((t, float(nv.nvmlDeviceGetPowerUsage(self._gpu))))
        except Exception:
            pass

    def energy(self, windows: list[tuple[float, float]]) -> dict:
        """Joules this GPU drew over ``windows`` (intervals of time.perf_counter())."""
        if self._nvml is None:
            return {"measured": False, "why": "no GPU: NVML reads a GPU's energy; CPU energy is not measured"}
        seconds = sum(b - a for a, b in windows)
        if len(self.energy_mj) >= 2:
            at = lambda x: _interpolate(self.energy_mj, x)  # noqa: E731
            joules = sum(at(b) - at(a) for a, b in windows) / 1e3
            source = "nvml total energy counter"
        elif len(self.power_mw) >= 2:
            joules = sum(_integral(self.power_mw, a, b) for a, b in windows) / 1e3
            source = f"nvml power draw sampled every {self.interval:g} s"
        else:
            return {"measured": False, "why": "NVML gave neither an energy counter nor power readings"}
        return {"measured": True, "source": source, "joules": joules, "seconds": seconds}

    def _loop(self) -> None:
        self._last = (time.perf_counter(), self._tree_cpu_seconds(self.proc.children(recursive=True)))
        psutil.cpu_percent(interval=None)  # primes the system-wide counter
        while not self._stop.wait(self.interval):
            try:
                self._last = self._sample(self._last)
            except psutil.Error:
                continue

    def start(self) -> ResourceMonitor:
        self._nvml, self._gpu = _nvml_handle(self.gpu_index) if self.gpu_index is not None else (None, None)
        self._energy_counter = True
        if self._nvml is not None:
            self._sample_energy()  # a reading before the window opens
        self._thread = threading.Thread(target=self._loop, name="loaderbench-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            last, self._last = getattr(self, "_last", None), None  # once: stop() is called again in `finally`
            if self._nvml is not None and last is not None and not self._thread.is_alive():
                self._sample_energy()  # and one after it has closed (in time order: the thread has ended)
            if last is not None and not self._thread.is_alive() and time.perf_counter() - last[0] > 0.05:
                try:  # the part interval since the last sample: a run shorter than one interval has one
                    self._sample(last)
                except psutil.Error:
                    pass
            if not self.affinity:  # not even that (stopped at once)
                seen = affinity_of_tree(self.proc)
                self.affinity.update(seen["cores"])
                self.affinity_processes = seen["processes"]
        return self.summary()

    def summary(self) -> dict:
        mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
        mib = lambda xs: round(max(xs) / 2**20, 1) if xs else None  # noqa: E731
        peak_total = max((a + b for a, b in zip(self.rss_main, self.rss_children)), default=None)
        return {
            "samples": len(self.system_cpu_percent),
            "interval_s": self.interval,
            "process_cpu_percent_mean": mean(self.cpu_percent),
            "system_cpu_percent_mean": mean(self.system_cpu_percent),
            "cpu_count": psutil.cpu_count(),
            "peak_rss_main_mib": mib(self.rss_main),
            "peak_rss_children_mib": mib(self.rss_children),
            "peak_rss_total_mib": round(peak_total / 2**20, 1) if peak_total is not None else None,
            "child_processes": self.children_seen,
            "affinity_cores": sorted(self.affinity),
            "affinity_processes": self.affinity_processes,
            "gpu_util_percent_mean": mean(self.gpu_util),
            "gpu_memory_used_peak_mib": mib(self.gpu_mem),
        }


def _interpolate(samples: list[tuple[float, float]], x: float) -> float:
    """A cumulative counter's value at ``x``, linear between readings (clamped at the ends)."""
    import bisect

    times = [t for t, _ in samples]
    i = bisect.bisect_left(times, x)
    if i <= 0:
        return samples[0][1]
    if i >= len(samples):
        return samples[-1][1]
    (t0, v0), (t1, v1) = samples[i - 1], samples[i]
    return v0 + (v1 - v0) * (x - t0) / (t1 - t0) if t1 > t0 else v1


def _integral(samples: list[tuple[float, float]], a: float, b: float) -> float:
    """The integral of a sampled rate (power) from ``a`` to ``b``, trapezoids between readings."""
    cut = sorted({a, b, *(t for t, _ in samples if a < t < b)})
    values = [_interpolate(samples, t) for t in cut]  # a rate is read between readings the same way
    return sum((t1 - t0) * (v0 + v1) / 2 for t0, t1, v0, v1 in zip(cut, cut[1:], values, values[1:]))
