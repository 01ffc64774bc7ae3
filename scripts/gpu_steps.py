"""The GPU lease's measurements, in priority order, kept as they are made (scripts/gpu-evidence.sh,
scripts/gpu-dali.sh call this; docs/gpu.md says which calls to make).

    python3 scripts/gpu_steps.py evidence|dali --out DIR [--rehearse] [--resume TARBALL] [--budget S]

Every step is one `bench run` in a fresh process. After each one the whole work folder is packed
into DIR/<plan>.tar.gz (written aside, then renamed) and DIR/README.md is rendered, so a command
cut off at its limit still returns what it reached; a later call given that tarball (--resume, or
.gpu/back/<plan>.tar.gz carried back) skips what is done. DIR holds at most 4 files.

A step starts only if its expected seconds fit in what is left of --budget. The expected seconds
come from the last GPU runs (reports/ladder-h100-resnet50: ~20 s per 30-step resnet50 run on one
H100, process start included; reports/gpu-decode-h100) plus conversion and data generation at 16
cores scaled from this 2-core box (40 images/s per core generated); `--rehearse` prints them.

--rehearse: every step on this machine's CPU with tiny sizes (small model, 32 px, 4 steps); a step
that needs CUDA is replaced by a stand-in that parses its command line and checks its options; the
packed DIR is checked (file count, sizes) as the device's $OUT limits it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # what comes back from the device's $OUT
BUDGET_S = 480  # one command of at most 8 minutes

R50 = ["--model", "resnet50", "--amp", "bf16", "--channels-last", "--batch-size", "128"]
R18 = ["--model", "resnet18", "--amp", "bf16", "--channels-last", "--batch-size", "128"]
TUNED = ["--pin-memory", "--persistent-workers", "--prefetch-factor", "4", "--device-normalize"]
WDS_TUNED = [
    "--pin-memory",
    "--prefetch-factor",
    "4",
    "--device-normalize",
]  # an IterableDataset: no persistent


@dataclasses.dataclass
class Step:
    label: str
    argv: list[str]  # `bench run` arguments, without --data, --steps and --out
    expected_s: float
    cuda_only: bool = False  # rehearsal: a stand-in checks its command line
    needs: str | None = None  # a module the step's backend needs (skipped, saying so, without it)
    cpus: int = 0  # 0: every core; rehearsed at 1


def evidence_plan() -> list[Step]:
    steps = []
    for model, shape, k, scale in (("r50", R50, 0, 1.0), ("r50", R50, 4, 1.15), ("r18", R18, 0, 0.65)):
        where = f"{model}-{k or 16}c"
        w = str(k or 16)
        steps += [
            Step(f"{where}-synthetic", ["--loader", "synthetic", *shape], 20 * scale, cpus=k),
            Step(f"{where}-torch", ["--loader", "torch", "--workers", w, *TUNED, *shape], 22 * scale, cpus=k),
            Step(
                f"{where}-torch-gpu-decode",
                ["--loader", "torch", "--workers", w, "-o", "decode=gpu", *shape],
                24 * scale,
                cuda_only=True,
                cpus=k,
            ),
            # the .beton and the shards are converted once (in the first step that reads them)
            Step(
                f"{where}-ffcv",
                ["--loader", "ffcv", "--workers", w, *shape],
                (35 if not steps else 22) * scale,
                needs="ffcv",
                cpus=k,
            ),  # fmt: skip
            Step(
                f"{where}-wds",
                ["--loader", "wds", "--workers", w, *WDS_TUNED, *shape],
                (28 if not steps else 22) * scale,
                needs="webdataset",
                cpus=k,
            ),  # fmt: skip
            Step(
                f"{where}-spdl",
                ["--loader", "spdl", "--workers", w, *shape],
                22 * scale,
                needs="spdl.io",
                cpus=k,
            ),
        ]
    return steps


def dali_plan() -> list[Step]:
    s = []
    for mode, expected in (("loader-only", 15), ("e2e", 22)):
        extra = ["--loader-only", "--batch-size", "128"] if mode == "loader-only" else R50
        for threads in (12, 16):  # DALI's CPU pipeline ("dali-cpu"): NVIDIA's advice for 16 cores per GPU
            s.append(Step(f"dali-cpu-{threads}t-{mode}", ["--loader", "dali", "-o", "decode=cpu", "--workers",
                                                          str(threads), *extra], expected, needs="nvidia.dali"))  # fmt: skip
        for load in (0.0, 0.65, 0.9, 1.0):  # how much goes to the hardware JPEG engines
            s.append(Step(f"dali-mixed-hw{load:g}-{mode}", ["--loader", "dali", "-o", "decode=gpu", "-o",
                          f"hw_decoder_load={load}", *extra], expected, cuda_only=True, needs="nvidia.dali"))  # fmt: skip
        s.append(Step(f"dali-mixed-4c-{mode}", ["--loader", "dali", "-o", "decode=gpu", "--workers", "4", *extra],
                      expected, cuda_only=True, needs="nvidia.dali", cpus=4))  # fmt: skip
        s.append(Step(f"dali-mixed-padded-{mode}", ["--loader", "dali", "-o", "decode=gpu", *PADDED, *extra],
                      expected, cuda_only=True, needs="nvidia.dali"))  # fmt: skip
    s += [
        Step(
            "dali-mixed-noantialias-e2e",
            ["--loader", "dali", "-o", "decode=gpu", "-o", "antialias=false", *R50],
            22,
            cuda_only=True,
            needs="nvidia.dali",
        ),  # fmt: skip
        Step("r50-16c-synthetic", ["--loader", "synthetic", *R50], 20),
        Step("profile-synthetic", ["--loader", "synthetic", "--profile-steps", "5", *R50], 22),
        Step(
            "profile-dali-mixed",
            ["--loader", "dali", "-o", "decode=gpu", "--profile-steps", "5", *R50],
            25,
            cuda_only=True,
            needs="nvidia.dali",
        ),  # fmt: skip
    ]
    return s


# NVIDIA's ResNet-50 example (DeepLearningExamples, PyTorch, image_classification/dataloaders.py)
PADDED = ["-o", "device_memory_padding=211025920", "-o", "host_memory_padding=140544512",
          "-o", "preallocate_width_hint=5980", "-o", "preallocate_height_hint=6430"]  # fmt: skip
PLANS = {"evidence": evidence_plan, "dali": dali_plan}
SETUP_S = {"evidence": 30, "dali": 50}  # wheels installed, 7,000 + 100 images generated at 16 cores
REAL = {"train_per_class": 700, "val_per_class": 10, "steps": 50, "warmup": 10}
TINY = {"train_per_class": 6, "val_per_class": 2, "steps": 4, "warmup": 1}


def tiny(argv: list[str]) -> list[str]:
    """The rehearsal's sizes: the small model, 32 px, batch 8, no AMP or channels_last."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--model", "--batch-size"):
            out += [a, "small" if a == "--model" else "8"]
            i += 2
            continue
        if a in ("--amp",):
            i += 2
            continue
        if a == "--channels-last":
            i += 1
            continue
        if a == "--workers":
            out += [a, "1"]
            i += 2
            continue
        out.append(a)
        i += 1
    return [*out, "--image-size", "32"]


def run_in_rehearsal(steps: list[Step]) -> set[str]:
    """The steps a rehearsal runs: the first of each command shape that needs no CUDA. The same
    loader and options at another model, worker or core count are parsed and checked, not run
    again (the suite's time)."""
    shapes, labels = set(), set()
    for s in steps:
        shape = tuple(_without(s.argv, ("--model", "--workers", "--batch-size")))
        if not s.cuda_only and shape not in shapes:
            labels.add(s.label)
        shapes.add(shape)
    return labels


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def stand_in(argv: list[str]) -> str:
    """What a CPU can check of a CUDA-only step: its command line parses, its options exist and
    take their values, and the run's own checks pass apart from CUDA's presence."""
    from bench.harness import runner
    from bench.harness.spec import RunSpec

    spec = RunSpec.from_argv(argv)  # unknown flags, unknown options and bad values fail here
    runner.check(dataclasses.replace(spec, device="auto"))  # the model, steps, --cpus, folders
    return f"stand-in: parsed and checked, {' '.join(spec.to_argv())}"


def results_of(work: Path) -> dict[str, list]:
    from bench.harness.report import results_in

    got: dict[str, list] = {}
    for r in results_in(work / "runs").values() if (work / "runs").is_dir() else []:
        got.setdefault(r.label, []).append(r)
    return got


def table(plan: str, steps: list[Step], status: dict, work: Path, rehearse: bool) -> str:
    sizes = TINY if rehearse else REAL
    got = results_of(work)
    env = next((rs[0].environment for rs in got.values()), {})
    gpu = (env.get("gpus") or [{}])[0].get("name", "no GPU")
    lines = [
        f"# GPU lease: {plan} ({'REHEARSAL on the CPU: tiny sizes, not figures' if rehearse else gpu})",
        "",
        f"Produced by `bash scripts/gpu-{plan}.sh{' --rehearse' if rehearse else ''}` at commit "
        f"{env.get('git_commit', '?')[:10]} on {env.get('cpu_count', '?')} cores; "
        + ("the small model, batch 8, 32 px, " if rehearse else "batch 128, ")
        + f"{sizes['steps']} steps ({sizes['warmup']} warm-up), {sizes['train_per_class'] * 10:,} generated images. "
        "% of ceiling: against synthetic at the same model and cores. GPU ms/step: the model's step "
        "on the GPU (CUDA events); a loader that slows the model down shows there, not in data wait. "
        "Every result is in the tarball beside this file (`bench report` renders it).",
        "",
        "| step | status | images/s | % of ceiling | data wait | GPU ms/step | J / 1k images | expected s | took s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for st in steps:
        rs = got.get(st.label, [])
        s = status.get(st.label, {})
        if rs:
            r = rs[0]
            where = "-".join(st.label.split("-")[:2]) if st.label.startswith("r") else "r50-16c"
            ceiling = got.get(f"{where}-synthetic")
            pct = f"{r.ips / ceiling[0].ips:.0%}" if ceiling and not r.loader_only else "-"
            gms = r.metrics.compute_time_s.get("median")
            jk = r.metrics.joules_per_1000_images
            cells = [
                f"{r.ips:,.1f}",
                pct,
                "-" if r.metrics.data_wait_share is None else f"{r.metrics.data_wait_share:.0%}",
                "-"
                if not gms or r.loader_only or not r.config["device"].startswith("cuda")
                else f"{gms * 1e3:.1f}",
                "not measured" if jk is None else f"{jk:,.1f}",
            ]
        else:
            cells = ["-"] * 5
        took = s.get("seconds")
        lines.append(
            f"| {st.label} | {s.get('status', 'not reached')} | "
            + " | ".join(cells)
            + f" | {st.expected_s:.0f} | "
            f"{'-' if took is None else f'{took:.0f}'} |"
        )
    profiled = [(label, rs[0].metrics.profile) for label, rs in sorted(got.items()) if rs[0].metrics.profile]
    if profiled:
        from bench.trainer.profile import line

        lines += ["", "## Profiles (torch.profiler over steady steps; their images/s include its cost)", ""]
        for label, prof in profiled:
            top = ", ".join(f"{k['name'][:60]} {k['ms_per_step']:.2f} ms" for k in prof["top_kernels"][:4])
            lines.append(f"- **{label}**: {line(prof)}" + (f"; top kernels per step: {top}" if top else ""))
    return "\n".join(lines) + "\n"


def pack(plan: str, out: Path, work: Path, steps, status, rehearse: bool) -> None:
    (work / "steps.json").write_text(json.dumps(status, indent=1))
    tmp = out / f".{plan}.tar.gz.partial"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in ("runs", "steps.json", "log.txt"):
            if (work / name).exists():
                tar.add(work / name, arcname=name)
    os.replace(tmp, out / f"{plan}.tar.gz")
    readme = table(plan, steps, status, work, rehearse)
    (out / ".README.md.partial").write_text(readme)
    os.replace(out / ".README.md.partial", out / "README.md")
    shutil.copyfile(work / "log.txt", out / "log.txt")


def check_out(out: Path) -> list[str]:
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = (
        [f"{len(files)} files under {out}: at most {MAX_FILES} come back"] if len(files) > MAX_FILES else []
    )
    problems += [
        f"{p} is {p.stat().st_size} bytes: over 16 MiB" for p in files if p.stat().st_size > MAX_FILE_BYTES
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_steps")
    p.add_argument("plan", choices=sorted(PLANS))
    p.add_argument("--out", required=True, help="the folder that comes back ($OUT on the device)")
    p.add_argument("--rehearse", action="store_true", help="every step on this CPU, tiny sizes")
    p.add_argument("--resume", help="a tarball from an earlier call: its steps are not run again")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds this command may take")
    p.add_argument("--work", help="work folder (default /tmp/gpu-<plan>)")
    a = p.parse_args(argv)
    started = time.monotonic()
    steps = PLANS[a.plan]()
    sizes = TINY if a.rehearse else REAL
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or f"/tmp/gpu-{a.plan}")
    shutil.rmtree(work / "runs", ignore_errors=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    status: dict = {}
    resume = Path(a.resume) if a.resume else REPO / ".gpu" / "back" / f"{a.plan}.tar.gz"
    if resume.is_file():
        with tarfile.open(resume) as tar:
            tar.extractall(work, filter="data")
        status = json.loads((work / "steps.json").read_text())
    log = open(work / "log.txt", "a")

    def say(msg: str) -> None:
        line = f"[{time.monotonic() - started:6.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    total = SETUP_S[a.plan] + sum(s.expected_s for s in steps)
    say(
        f"{a.plan}: {len(steps)} steps, expected {total:.0f} s in all (set-up {SETUP_S[a.plan]} s), budget {a.budget:.0f} s"
    )
    for s in steps:
        say(f"  expect {s.expected_s:5.0f} s  {s.label}")
    data = work / "data"
    if not (data / "train").is_dir():
        say(f"generating {sizes['train_per_class'] * 10:,} images into {data}")
        gen = [sys.executable, "-m", "bench.cli", "data", "synth", "--out", str(data)]
        gen += [
            "--train-per-class",
            str(sizes["train_per_class"]),
            "--val-per-class",
            str(sizes["val_per_class"]),
        ]
        made = subprocess.run(gen, cwd=REPO, capture_output=True, text=True)
        if made.returncode != 0:
            status["set-up"] = {"status": "FAILED generating the data: " + made.stderr.strip()[-500:]}
            say(status["set-up"]["status"])
            pack(a.plan, out, work, steps, status, a.rehearse)
            return 1
    done = results_of(work)
    rehearsed = run_in_rehearsal(steps)
    for s in steps:
        if s.label in done and status.get(s.label, {}).get("status") in ("ok", "rehearsed"):
            say(f"{s.label}: kept from {resume.name}")
            continue
        left = a.budget - (time.monotonic() - started)
        if not a.rehearse and s.expected_s > left:
            status[s.label] = {
                "status": f"not started: {left:.0f} s left of the budget, {s.expected_s:.0f} expected"
            }
            say(f"{s.label}: {status[s.label]['status']}")
            continue
        if s.needs and importlib.util.find_spec(s.needs.split(".")[0]) is None:
            status[s.label] = {"status": f"skipped: {s.needs} is not installed here (not carried)"}
            say(f"{s.label}: {status[s.label]['status']}")
            pack(a.plan, out, work, steps, status, a.rehearse)
            continue
        argv = tiny(s.argv) if a.rehearse else list(s.argv)
        cpus = (1 if s.cpus else 0) if a.rehearse else s.cpus
        argv += ["--cpus", str(cpus)] if cpus else []
        argv += ["--data", str(data), "--steps", str(sizes["steps"]), "--warmup-steps", str(sizes["warmup"])]
        argv += ["--no-eval", "--label", s.label, "--out", str(work / "runs")]
        t0 = time.monotonic()
        if a.rehearse and s.label not in rehearsed:
            try:
                status[s.label] = {"status": "rehearsed", "how": stand_in(argv), "seconds": 0.0}
            except Exception as exc:  # a typo in a flag or an option: found here, not on the GPU
                status[s.label] = {"status": f"FAILED stand-in: {exc}"}
        else:
            if not a.rehearse:
                argv += ["--device", "cuda"]
            say(f"{s.label}: bench run {' '.join(argv)}")
            limit = max(30.0, a.budget - (time.monotonic() - started)) if not a.rehearse else 300
            try:
                proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", *argv], cwd=REPO, capture_output=True,
                                      text=True, timeout=limit)  # fmt: skip
                ok = proc.returncode == 0
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            except subprocess.TimeoutExpired:
                ok, tail = False, [f"timed out after {limit:.0f} s"]
            status[s.label] = {"status": "ok" if ok else "FAILED: " + " / ".join(tail)[-300:],
                               "seconds": time.monotonic() - t0}  # fmt: skip
        say(f"{s.label}: {status[s.label]['status']} ({time.monotonic() - t0:.1f} s)")
        pack(a.plan, out, work, steps, status, a.rehearse)
    pack(a.plan, out, work, steps, status, a.rehearse)
    problems = check_out(out)
    took = [v["seconds"] for v in status.values() if v.get("seconds")]
    say(
        f"done in {time.monotonic() - started:.0f} s; {sum(v['status'] in ('ok', 'rehearsed') for v in status.values())} "
        f"of {len(steps)} steps ok" + (f"; median step {statistics.median(took):.1f} s" if took else "")
    )
    for msg in problems:
        say(f"OUT PROBLEM: {msg}")
    failed = [k for k, v in status.items() if v["status"].startswith("FAILED")]
    if a.rehearse and total > BUDGET_S:
        say(f"REHEARSAL PROBLEM: the steps are expected to take {total:.0f} s, over {BUDGET_S} s")
        return 1
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
