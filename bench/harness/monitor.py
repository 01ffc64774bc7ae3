"""Resource sampling during a run: CPU utilisation and memory of this process and its children
(DataLoader workers, DALI/FFCV threads live in the process itself) through psutil, and GPU
utilisation and memory through NVML (nvidia-ml-py) when there is a GPU."""

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
        return now, cpu

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
        self._thread = threading.Thread(target=self._loop, name="loaderbench-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            last, self._last = getattr(self, "_last", None), None  # once: stop() is called again in `finally`
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
