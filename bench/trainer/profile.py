"""A few steady steps under torch.profiler, summarised into the result: GPU kernel time per stream
(a loader decoding on its own stream beside the model shows here), the CUDA runtime's allocation
and synchronisation calls (a loader that allocates or synchronises per batch shows there), and the
top operators and kernels. Kept as figures, not as a trace file: a lease returns 8 files."""

from __future__ import annotations

import collections

import torch

# CUDA runtime calls that allocate (a caching allocator should make these rare after warm-up) or
# make the host wait for the device
ALLOCATION = ("cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost", "cudaHostRegister")
SYNCHRONISATION = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaStreamWaitEvent",
)


def start(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=False, with_stack=False)
    prof.__enter__()
    return prof


def finish(prof, device: torch.device, steps: int) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof.__exit__(None, None, None)
    return summarise(_events(prof), steps, cuda=device.type == "cuda")


def _events(prof) -> list[dict]:
    """Every recorded activity as {name, device: 'cpu'|'cuda', stream, us}."""
    out = []
    for e in prof.profiler.kineto_results.events():
        on_gpu = "cuda" in str(e.device_type()).lower()
        out.append(
            {
                "name": e.name(),
                "device": "cuda" if on_gpu else "cpu",
                "stream": e.device_resource_id() if on_gpu else None,
                "us": e.duration_ns() / 1e3,
            }
        )
    return out


def summarise(events: list[dict], steps: int, cuda: bool, top: int = 8) -> dict:
    """Per profiled step: kernel ms per stream, allocation and synchronisation calls (count, ms)."""
    per_stream = collections.Counter()
    kernels, ops = collections.Counter(), collections.Counter()
    calls = {n: [0, 0.0] for n in (*ALLOCATION, *SYNCHRONISATION)}
    for e in events:
        if e["device"] == "cuda":
            per_stream[e["stream"]] += e["us"]
            kernels[e["name"]] += e["us"]
        elif e["name"] in calls:
            calls[e["name"]][0] += 1
            calls[e["name"]][1] += e["us"]
        elif e["name"].startswith("aten::"):
            ops[e["name"]] += e["us"]
    n = max(steps, 1)

    def per_step(counter):
        return [{"name": k, "ms_per_step": v / 1e3 / n} for k, v in counter.most_common(top)]

    return {
        "steps": steps,
        "cuda": cuda,
        "kernel_ms_per_step_by_stream": {str(s): v / 1e3 / n for s, v in sorted(per_stream.items())},
        "allocation_calls_per_step": {k: calls[k][0] / n for k in ALLOCATION if calls[k][0]},
        "synchronisation_calls_per_step": {k: calls[k][0] / n for k in SYNCHRONISATION if calls[k][0]},
        "synchronisation_ms_per_step": sum(calls[k][1] for k in SYNCHRONISATION) / 1e3 / n,
        "top_kernels": per_step(kernels),
        "top_cpu_ops": per_step(ops),  # CPU time of the operators, children included
    }


def line(p: dict | None) -> str | None:
    if not p:
        return None
    if not p["cuda"]:
        top = ", ".join(f"{o['name']} {o['ms_per_step']:.1f}" for o in p["top_cpu_ops"][:3])
        return f"{p['steps']} steps on the CPU (no kernels); top operators, ms per step: {top}"
    streams = ", ".join(f"stream {s}: {ms:.1f} ms" for s, ms in p["kernel_ms_per_step_by_stream"].items())
    alloc = sum(p["allocation_calls_per_step"].values())
    sync = sum(p["synchronisation_calls_per_step"].values())
    return (
        f"{p['steps']} steps; kernels per step: {streams or 'none'}; {alloc:g} allocation and {sync:g} "
        f"synchronisation calls per step ({p['synchronisation_ms_per_step']:.2f} ms waiting)"
    )
