"""Renderers over result files: `bench report` (a folder of results, with the ladder of a
`bench sweep` when there is one, into README.md + PNG plots) and `bench compare` (ratios between
two result sets). Every figure is computed here from the results of record; nothing is copied from
a summary that could disagree with them."""

from __future__ import annotations

import collections
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from loaders.stored import write_atomic

from ..errors import BenchError
from . import html
from .result import Result, ResultError, load


class ReportError(BenchError):
    pass


# -- reading ---------------------------------------------------------------------------------------


def results_in(folder: Path) -> dict[str, Result]:
    """Every result file under ``folder`` (recursively), by path relative to it."""
    found = {}
    for path in sorted(folder.rglob("*.json")):
        if path.name.startswith(".") or path.name in ("sweep.json", "tune.json", "doctor.json"):
            continue
        try:
            found[str(path.relative_to(folder))] = load(path)
        except ResultError:
            continue  # a manifest or another tool's JSON, not a result
    return found


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def regime_of(r: Result) -> str:
    """Where the run's data lived: warm, cold, or s3 with its shaping (results before regimes: warm)."""
    c = r.config
    regime = c.get("storage", "warm")
    if regime != "s3":
        return regime
    shaping = f" {c.get('s3_latency_ms', 0):g} ms" + (f" {c['s3_mbps']:g} Mb/s" if c.get("s3_mbps") else "")
    return f"s3{shaping}"


def signature(r: Result) -> tuple:
    """What makes two runs the same configuration (trials of one thing)."""
    c = r.config
    st = r.data["storage"]
    res = (st.get("backend_storage") or {}).get("max_resolution") or st.get("max_resolution") or "original"
    return (
        r.label,
        r.mode,
        c["loader"],
        json.dumps(r.options, sort_keys=True),
        c["amp"],
        c["channels_last"],
        c["compile"],
        c["world_size"],
        c["batch_size"],
        c["image_size"],
        str(res),
        regime_of(r),
    )


@dataclass
class Group:
    runs: list[Result] = field(default_factory=list)

    @property
    def ips(self) -> list[float]:
        return [r.ips for r in self.runs]

    def median(self, fn):
        return _median([fn(r) for r in self.runs])


def groups_of(results: dict[str, Result]) -> dict[tuple, Group]:
    g: dict[tuple, Group] = collections.defaultdict(Group)
    for r in results.values():
        g[signature(r)].runs.append(r)
    return dict(g)


# -- the ladder ------------------------------------------------------------------------------------

# A rung's medians over its trials, each read from a Result.
MEDIANS = {
    "data_wait": lambda r: r.metrics.data_wait_share,
    "val_loss": lambda r: r.metrics.final_val_loss,
    "val_acc": lambda r: r.metrics.final_val_accuracy,
    "eval_s": lambda r: r.metrics.median_eval_seconds,
    "cpu_pct": lambda r: r.metrics.resource("process_cpu_percent_mean"),
    "gpu_util": lambda r: r.metrics.resource("gpu_util_percent_mean"),
    "peak_rss_mib": lambda r: r.metrics.resource("peak_rss_total_mib"),
    "joules_k": lambda r: r.metrics.joules_per_1000_images,  # None on the CPU: not measured
    "gpu_compute_s": lambda r: (
        r.metrics.compute_time_s.get("median") if r.config.get("device", "").startswith("cuda") else None
    ),
}


@dataclass
class Rung:
    """One step of the ladder with its figures: images/s over its trials, speedups against the
    baseline (cumulative) and its reference step (marginal), % of the ceiling, the MEDIANS, and for
    early stopping the time to the target accuracy against the time of every epoch."""

    key: str
    title: str
    kind: str
    status: str
    reason: str | None
    kept: bool | None
    trials: list[Result]
    reference: str | None = None
    ips: float | None = None
    ips_min: float | None = None
    ips_max: float | None = None
    marginal: float | None = None
    cumulative: float | None = None
    ceiling_pct: float | None = None
    eval_speedup: float | None = None
    time_to_target: float | None = None
    full_time: float | None = None
    target_epoch: int | None = None
    medians: dict = field(default_factory=dict)

    def __getattr__(self, name):  # rung.data_wait, rung.val_acc, ...: the MEDIANS
        if name in MEDIANS:
            return self.medians.get(name)
        raise AttributeError(name)


def ladder(sweep: dict, folder: Path, results: dict[str, Result] | None = None) -> list[Rung]:
    results = results if results is not None else results_in(folder)

    def trials_of(paths):
        missing = [p for p in paths if p not in results]
        if missing:
            raise ReportError(
                f"{folder}: sweep.json names result(s) that are missing or unreadable: "
                f"{', '.join(missing[:3])}"
            )
        return [results[p] for p in paths]

    ceilings = {k: _median([r.ips for r in trials_of(v)]) for k, v in sweep.get("ceilings", {}).items()}
    target = sweep["settings"]["target_accuracy"]
    rungs: dict[str, Rung] = {}
    for st in sweep["steps"]:
        trials = trials_of(st["results"])
        g = Group(trials)
        ips = g.ips
        rung = Rung(
            st["key"],
            st["title"],
            st["kind"],
            st["status"],
            st["reason"],
            st["kept"],
            trials,
            reference=st.get("reference"),
        )
        if ips:
            rung.ips, rung.ips_min, rung.ips_max = statistics.median(ips), min(ips), max(ips)
            rung.medians = {name: g.median(fn) for name, fn in MEDIANS.items()}
            if st.get("ceiling") and ceilings.get(st["ceiling"]):
                rung.ceiling_pct = rung.ips / ceilings[st["ceiling"]]
        base = rungs.get("baseline")
        ref = rungs.get(st.get("reference") or "")
        if rung.ips and base and base.ips:
            rung.cumulative = rung.ips / base.ips
        if rung.ips and ref and ref.ips:
            rung.marginal = rung.ips / ref.ips
        if rung.eval_s and ref and ref.eval_s:
            rung.eval_speedup = ref.eval_s / rung.eval_s
        if st["kind"] == "early_stop" and trials:
            epochs = trials[0].metrics.epochs
            elapsed = 0.0
            for e in epochs:
                elapsed += e["train_seconds"] + (e.get("eval_seconds") or 0.0)
                if (
                    rung.time_to_target is None
                    and e.get("val_accuracy") is not None
                    and e["val_accuracy"] >= target
                ):
                    rung.time_to_target, rung.target_epoch = elapsed, e["epoch"] + 1
            rung.full_time = elapsed
        rungs[st["key"]] = rung
    return list(rungs.values())


def _x(v, fmt=".2f", suffix="x"):
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _pct(v):
    return "-" if v is None else f"{v:.0%}"


def ladder_table(rungs: list[Rung], sweep: dict) -> list[str]:
    lines = [
        "| step | what changed | images/s (median, min-max, trials) | marginal | cumulative | data wait "
        "| % of ceiling | val loss / acc | eval s | J / 1k images | kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rungs:
        if r.status != "ok":
            lines.append(f"| {r.key} | {r.title} | {r.status}: {r.reason} | | | | | | | | no |")
            continue
        ips = f"{r.ips:,.1f} ({r.ips_min:,.1f}-{r.ips_max:,.1f}, {len(r.trials)})"
        marginal = _x(r.marginal)
        if r.kind == "eval":
            marginal = f"eval {_x(r.eval_speedup)}"
        if r.kind == "early_stop":
            if r.time_to_target is None:
                marginal = (
                    f"target {sweep['settings']['target_accuracy']:g} not reached in "
                    f"{len(r.trials[0].metrics.epochs)} epochs"
                )
            else:
                marginal = (
                    f"time {_x(r.full_time / r.time_to_target)}: {r.time_to_target:.1f} s to the target "
                    f"(epoch {r.target_epoch}) vs {r.full_time:.1f} s"
                )
        acc = "-" if r.val_acc is None else f"{r.val_loss:.3f} / {r.val_acc:.3f}"
        kept = {True: "yes", False: "no", None: "-"}[r.kept] if r.kind != "baseline" else "-"
        if r.kind == "apart":
            kept = "helped; measured apart" if r.kept else "no; measured apart"
        lines.append(
            f"| {r.key} | {r.title} | {ips} | {marginal} | {_x(r.cumulative)} | {_pct(r.data_wait)} | "
            f"{_pct(r.ceiling_pct)} | {acc} | {_x(r.eval_s, '.2f', '')} | {_x(r.joules_k, ',.1f', '')} | {kept} |"
        )
    return lines


def memory_table(rungs: list[Rung]) -> list[str]:
    """Per rank, what the multi-rank steps held of the training state and their peak memory: the
    figure ZeRO and FSDP are for (medians over trials; ``a / b``: rank 0 / rank 1 ...)."""
    rows = []
    for r in rungs:
        mems = [t.metrics.memory_per_rank for t in r.trials if t.metrics.memory_per_rank]
        if r.status != "ok" or not mems or len(mems[0]["params_mib"]) < 2:
            continue

        def per_rank(key, mems=mems):
            ranks = zip(*(m[key] for m in mems))
            return " / ".join(f"{statistics.median(v):,.1f}" for v in ranks)

        state = [sum(m[k][0] for k in ("params_mib", "grads_mib", "optimizer_mib")) for m in mems]
        rows.append(
            f"| {r.key} | {per_rank('params_mib')} | {per_rank('grads_mib')} | {per_rank('optimizer_mib')} | "
            f"{statistics.median(state):,.1f} | {per_rank('peak_mib')} ({mems[0]['peak_is']}) | {r.ips:,.1f} |"
        )
    if not rows:
        return []
    return [
        "| step | parameters MiB per rank | gradients | optimizer state | training state, rank 0 | peak MiB per rank "
        "| images/s |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


# -- plots -----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_ladder(rungs: list[Rung], folder: Path) -> list[str]:
    plt = _plt()
    ok = [r for r in rungs if r.status == "ok" and r.kind != "early_stop"]
    if not ok:
        return []
    names = [r.key for r in ok]
    written = []

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.5))
    y = range(len(ok))
    ax.barh(
        [i + 0.2 for i in y], [r.cumulative or 0 for r in ok], height=0.4, label="cumulative (vs baseline)"
    )
    ax.barh(
        [i - 0.2 for i in y], [r.marginal or 0 for r in ok], height=0.4, label="marginal (vs the step before)"
    )
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("training images/s speedup (x)")
    ax.set_title("Speedup per technique")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "speedup.png", dpi=110)
    plt.close(fig)
    written.append("speedup.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(ok) + 1.5), sharey=True)
    axes[0].barh(list(y), [100 * (r.data_wait or 0) for r in ok], color="tab:red")
    axes[0].set_xlabel("share of step time waiting for data (%)")
    axes[0].set_title("Data wait per step")
    axes[1].barh(list(y), [100 * (r.ceiling_pct or 0) for r in ok], color="tab:green")
    axes[1].axvline(100, color="k", lw=0.8)
    axes[1].set_xlabel("images/s as % of the synthetic ceiling (same model settings)")
    axes[1].set_title("% of ceiling")
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(folder / "data-wait-and-ceiling.png", dpi=110)
    plt.close(fig)
    written.append("data-wait-and-ceiling.png")
    return written


def workers_series(results: dict[str, Result]) -> dict[str, dict[int, list[tuple[str, Result]]]]:
    """Single-rank runs by "loader, mode" and worker (or DALI/FFCV thread) count, with their paths,
    for every (loader, mode) measured at more than one count."""
    series = collections.defaultdict(lambda: collections.defaultdict(list))
    for path, r in results.items():
        w = r.workers
        if w is None or r.config["world_size"] != 1:
            continue
        mode = "loader only" if r.loader_only else f"end to end ({r.config['model']})"
        series[f"{r.config['loader']}, {mode}"][int(w)].append((path, r))
    return {k: dict(v) for k, v in series.items() if len(v) > 1}


def plot_workers(results: dict[str, Result], folder: Path) -> list[str]:
    """Images/s against workers for every (loader, mode) measured at more than one count."""
    series = workers_series(results)
    if not series:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [statistics.median(r.ips for _, r in pts[x]) for x in xs], marker="o", label=name)
    ax.set_xlabel("workers / threads")
    ax.set_ylabel("images/s (median of trials)")
    ax.set_title("Throughput vs workers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "workers.png", dpi=110)
    plt.close(fig)
    return ["workers.png"]


# -- the report ------------------------------------------------------------------------------------


def runs_table(results: dict[str, Result]) -> list[str]:
    lines = [
        "| label | mode | loader | options | amp / channels_last / compile | ranks | storage px | images/s median "
        "| min - max | trials | data wait | val acc | CPU % (process) | peak RSS MiB | GPU util % "
        "| GPU ms / step | J / 1k images | storage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sig, g in sorted(groups_of(results).items(), key=lambda kv: str(kv[0])):
        label, mode, loader, opts, amp, cl, comp, ranks, _, _, res, regime = sig
        ips = g.ips
        acc, cpu, rss, gpu, joules, gpu_s = (
            g.median(MEDIANS[k])
            for k in ("val_acc", "cpu_pct", "peak_rss_mib", "gpu_util", "joules_k", "gpu_compute_s")
        )
        opts_txt = ", ".join(f"{k}={v}" for k, v in json.loads(opts).items()) or "-"
        lines.append(
            f"| {label or '-'} | {mode} | {loader} | {opts_txt} | {amp} / {cl} / {comp} | {ranks} | {res} | "
            f"{statistics.median(ips):,.1f} | {min(ips):,.1f} - {max(ips):,.1f} | {len(ips)} | "
            f"{_pct(g.median(lambda r: r.metrics.data_wait_share))} | "
            f"{'-' if acc is None else f'{acc:.3f}'} | {'-' if cpu is None else f'{cpu:.0f}'} | "
            f"{'-' if rss is None else f'{rss:,.0f}'} | {'-' if gpu is None else f'{gpu:.0f}'} | "
            f"{'-' if gpu_s is None else f'{gpu_s * 1e3:.1f}'} | {'-' if joules is None else f'{joules:,.1f}'} | {regime} |"
        )
    return lines


def energy_note(results: dict[str, Result]) -> str:
    measured = [r for r in results.values() if r.metrics.joules_per_1000_images is not None]
    if not measured:
        return "GPU energy: not measured (no run here had a GPU whose energy NVML could read)."
    sources = sorted({r.metrics.energy["source"] for r in measured})
    return (
        f"GPU energy (J / 1k images): what the GPU(s) drew over the measured window, {', '.join(sources)}; "
        f"'-' where not measured. GPU ms / step: the model's step on the GPU (CUDA events), median."
    )


def _regime_order(regime: str) -> tuple:
    kind = regime.split()[0]
    latency = float(regime.split()[1]) if kind == "s3" and len(regime.split()) > 1 else 0.0
    return ({"warm": 0, "cold": 1}.get(kind, 2), latency, regime)


def _outside_cpu(r: Result) -> float | None:
    """Cores busy outside the run's own processes (a loopback object store and its shaper, here)."""
    system, own = (
        r.metrics.resource("system_cpu_percent_mean"),
        r.metrics.resource("process_cpu_percent_mean"),
    )
    cores = r.metrics.resource("cpu_count")
    if None in (system, own, cores):
        return None
    return max(0.0, (system * cores - own) / 100)


def regimes_table(results: dict[str, Result]) -> list[str]:
    """Each backend in each storage regime: loader-only and end-to-end images/s (median, range,
    trials), data wait, and what the storage served (medians over the loader-only trials)."""
    cells: dict = collections.defaultdict(lambda: {"lo": [], "e2e": []})
    for r in results.values():  # a label names a variant of a backend (dali-wds: dali reading shards)
        cells[(r.label or r.config["loader"], regime_of(r))]["lo" if r.loader_only else "e2e"].append(r)
    mb = lambda v: "-" if v is None else f"{v / 1e6:,.0f}"  # noqa: E731

    def rate(runs):
        ips = [r.ips for r in runs]
        if not ips:
            return "-"
        return f"{statistics.median(ips):,.0f} ({min(ips):,.0f}-{max(ips):,.0f}, n={len(ips)})"

    lines = [
        "| backend | storage | loader-only img/s (range, trials) | end-to-end img/s (range, trials) | data wait "
        "(e2e) | CPU outside the run (cores, e2e) | MB read from disk | requests | MB from store | staging s "
        "| e2e img/s with staging |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (loader, regime), c in sorted(cells.items(), key=lambda kv: (kv[0][0], _regime_order(kv[0][1]))):
        lo, e2e = c["lo"], c["e2e"]
        st = lambda key, runs=lo: _median([r.metrics.storage.get(key) for r in runs])  # noqa: E731
        staged = st("staging_s")
        wait = _median([r.metrics.data_wait_share for r in e2e])
        with_staging = _median([r.metrics.storage.get("images_per_second_with_staging") for r in e2e])
        outside = _median([_outside_cpu(r) for r in e2e])
        lines.append(
            f"| {loader} | {regime} | {rate(lo)} | {rate(e2e)} | {_pct(wait) if e2e else '-'} | "
            f"{_x(outside, '.2f', '')} | "
            f"{mb(st('bytes_read_from_disk'))} | {_x(st('requests'), ',.0f', '')} | {mb(st('bytes_from_store'))} | "
            f"{_x(staged, '.1f', '')} | {_x(with_staging, ',.0f', '')} |"
        )
    return lines


def machine_line(r: Result) -> str:
    return machine_line_of(r.environment)


def machine_line_of(env: dict) -> str:
    """The machine, libraries and commit of an ``envinfo.collect()`` record, in one line."""
    gpus = ", ".join(
        f"{g['name']}" + (f" (driver {g['driver']})" if g.get("driver") else "") for g in env["gpus"]
    )
    libs = env.get("libraries", {})
    extra = ", ".join(
        f"{k} {v}"
        for k, v in libs.items()
        if v and k not in ("torch", "torchvision", "numpy", "pillow", "loaderbench")
    )
    return (
        f"{env['cpu']}, {env['cpu_count']} cores, {gpus or 'no GPU'}; Python {env['python']}, "
        f"torch {libs.get('torch')}"
        + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
        + (f", {extra}" if extra else "")
        + f"; commit {(env.get('git_commit') or '?')[:10]}"
        + (" (dirty)" if env.get("git_dirty") else "")
    )


def data_line(r: Result) -> str:
    d, c = r.data, r.config
    st = d["storage"]
    size = f"{st['mean_width']:.0f}x{st['mean_height']:.0f} px mean" if st.get("mean_width") else "size n/a"
    q = f", JPEG q{st['jpeg_quality']}" if st.get("jpeg_quality") else ""
    return (
        f"{d['train_samples']} training images in {d['classes']} classes ({st.get('source')}, {size}{q}), "
        f"{c['image_size']} px crops, batch {c['batch_size']} per rank"
    )


def render(folder: Path | str, title: str | None = None, command: str | None = None) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: folder not found")
    results = results_in(folder)
    if not results:
        raise ReportError(f"{folder}: no result files (bench run --out {folder}/runs writes them)")
    docs = {
        name: json.loads((folder / name).read_text())
        for name in ("sweep.json", "tune.json", "doctor.json")
        if (folder / name).is_file()
    }
    first = next(iter(results.values()))
    lines = [
        f"# {title or folder.name}",
        "",
        f"Machine: {machine_line(first)}.",
        "",
        f"Data: {data_line(first)}.",
        "",
        "Throughput is images / wall time after the warm-up steps, summed over ranks (evaluation excluded); "
        "medians over trials. Rendered by `bench report` from the JSON results under this folder.",
        "",
    ]
    commands = [command] if command else [" ".join(d["command"]) for d in docs.values() if d.get("command")]
    if not commands:
        commands = sorted({" ".join(r.command) for r in results.values()})[:20]
    lines += ["Produced by:", "", "```", *commands, "```", ""]
    if (folder / "NOTES.md").is_file():  # what the results cannot say themselves (how a run ended, caveats)
        lines += ["## Notes", "", (folder / "NOTES.md").read_text().strip(), ""]
    plots: list[str] = []
    if "sweep.json" in docs:
        sweep = docs["sweep.json"]
        rungs = ladder(sweep, folder, results)
        s = sweep["settings"]
        lines += [
            "## The ladder",
            "",
            f"Model `{s['model']}`, {s['trials']} trial(s) per step of {s['steps']} steps "
            f"({s['warmup_steps']} warm-up). Each step adds one technique to the ones kept so far "
            "(a technique is kept when it raised images/s"
            + (", here: every one" if s["keep_all"] else "")
            + "); backend swaps are measured against the same stack; *marginal* is against the step named "
            "in `reference`, *cumulative* against the baseline, *% of ceiling* against the synthetic loader "
            "with the same model settings. `torch.compile` is measured on the stack so far but not carried on "
            "(every later process would compile again). Evaluation and early stopping change evaluation time "
            "and time to accuracy, not images/s.",
            "",
        ]
        lines += ladder_table(rungs, sweep) + [""]
        skipped = [r for r in rungs if r.status != "ok"]
        if skipped:
            lines += [
                "Not measured: " + "; ".join(f"`{r.key}` ({r.status}: {r.reason})" for r in skipped) + ".",
                "",
            ]
        res_lines = [
            "| step | CPU % of one core (process + workers) | peak RSS MiB (all processes) | GPU util % |",
            "|---|---|---|---|",
        ]
        for r in rungs:
            if r.status == "ok":
                res_lines.append(
                    f"| {r.key} | {_x(r.cpu_pct, '.0f', '')} | {_x(r.peak_rss_mib, ',.0f', '')} | "
                    f"{_x(r.gpu_util, '.0f', '')} |"
                )
        lines += ["Resources sampled during each step (medians of trials):", "", *res_lines, ""]
        memory = memory_table(rungs)
        if memory:
            lines += [
                "Memory per rank of the multi-rank steps (each rank's shard of the training state, "
                "measured after training, and its peak; medians of trials, ranks separated by /):",
                "",
                *memory,
                "",
            ]
        plots += plot_ladder(rungs, folder)
    if "tune.json" in docs:
        t = docs["tune.json"]
        best = " ".join(t["best_args"]) or "the backend's defaults"
        default = "n/a" if t.get("default_ips") is None else f"{t['default_ips']:,.1f}"
        lines += [
            "## Tuned settings (`bench tune`)",
            "",
            f"Best for `{t['loader']}` ({t['mode']}): `{best}` at {t['best_ips']:,.1f} img/s; "
            f"its defaults gave {default} img/s. Every setting tried:",
            "",
            "| options | images/s |",
            "|---|---|",
        ]
        for tr in t["tried"]:
            opts = ", ".join(f"{k}={v}" for k, v in tr["options"].items()) or "defaults"
            ips = tr.get("images_per_second")
            lines.append(f"| {opts} | {'failed: ' + tr['error'] if ips is None else f'{ips:,.1f}'} |")
        lines.append("")
    if "doctor.json" in docs:
        lines += ["## `bench doctor`", "", "```", *docs["doctor.json"]["verdict"].splitlines(), "```", ""]
    if len({regime_of(r) for r in results.values()}) > 1:
        lines += [
            "## Storage regimes",
            "",
            "*warm*: the files read once before the run; *cold*: evicted from the page cache before every "
            "epoch (verified with mincore); *s3 N ms*: a loopback moto server behind a shaper adding N ms "
            "before every request's first byte. Bytes read from disk: /proc/<pid>/io of the run's processes; "
            "requests and MB from the store: counted by the shaper (loader-only trials; listing and manifest "
            "requests included). Staging: the copy FFCV needs on local disk before it can read. CPU outside the "
            "run: the machine's busy cores less the run's own processes (the loopback store and shaper share "
            "these cores with the run).",
            "",
            *regimes_table(results),
            "",
        ]
    plots += plot_workers(results, folder)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Every configuration measured", "", *runs_table(results), "", energy_note(results), ""]
    path = write_atomic(folder / "README.md", "\n".join(lines))
    html.render_folder(folder, results, title or folder.name)
    return path


def render_html(folder: Path | str) -> Path:
    """index.html from the folder's README.md as it stands (a script may have written it) and its
    results: for the folders whose README is not `bench report`'s own."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: folder not found")
    if not (folder / "README.md").is_file() and not any(folder.rglob("*.json")):
        raise ReportError(f"{folder}: no README.md and no results to render")
    return html.render_folder(folder, results_in(folder), folder.name)


# -- compare ---------------------------------------------------------------------------------------

METRICS = (
    ("images/s", lambda r: r.ips, True),
    ("step time median s", lambda r: r.metrics.step_time_s.get("median"), False),
    ("data-wait share", lambda r: r.metrics.data_wait_share, False),
    ("eval s", lambda r: r.metrics.median_eval_seconds, False),
    ("val accuracy", lambda r: r.metrics.final_val_accuracy, True),
    ("peak RSS MiB", lambda r: r.metrics.resource("peak_rss_total_mib"), False),
    ("GPU time per step s", MEDIANS["gpu_compute_s"], False),  # a loader that slows the model shows here
    ("joules per 1,000 images", MEDIANS["joules_k"], False),
)


def _result_set(path: Path) -> dict[str, Group]:
    """A result file (one group) or a folder (grouped by label, else by configuration)."""
    if path.is_file():
        r = load(path)
        return {r.label or "result": Group([r])}
    if not path.is_dir():
        raise ReportError(f"{path}: no such result file or folder")
    res = results_in(path)
    if not res:
        raise ReportError(f"{path}: no result files")
    by: dict[str, Group] = collections.defaultdict(Group)
    for r in res.values():
        key = r.label or f"{r.config['loader']} {r.mode} {json.dumps(r.options, sort_keys=True)}"
        by[key].runs.append(r)
    return dict(by)


def compare(a: Path | str, b: Path | str) -> list[dict]:
    """Per matching group and metric: the median in A, in B, and B / A."""
    ga, gb = _result_set(Path(a)), _result_set(Path(b))
    if len(ga) == 1 and len(gb) == 1:  # two single results or two single configurations: compare them
        pairs = [(f"{next(iter(ga))} -> {next(iter(gb))}", next(iter(ga.values())), next(iter(gb.values())))]
    else:
        common = [k for k in ga if k in gb]
        if not common:
            raise ReportError(f"{a} and {b} have no configuration (label) in common")
        pairs = [(k, ga[k], gb[k]) for k in common]
    rows = []
    for name, x, y in pairs:
        for metric, fn, higher_better in METRICS:
            va, vb = x.median(fn), y.median(fn)
            ratio = vb / va if va not in (None, 0) and vb is not None else None
            rows.append(
                {
                    "group": name,
                    "metric": metric,
                    "a": va,
                    "b": vb,
                    "ratio": ratio,
                    "higher_is_better": higher_better,
                    "trials": (len(x.runs), len(y.runs)),
                }
            )
    return rows


# -- freshness -------------------------------------------------------------------------------------

MEASURED_CODE = ("loaders", "bench/trainer")  # what a result's figures depend on


def _git(repo: Path, *args: str) -> str | None:
    import subprocess

    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def producing_commits(folder: Path) -> set[str]:
    """The commits recorded by the JSON under ``folder`` (results, plans, any document with an
    ``environment.git_commit``)."""
    found = set()
    for path in folder.rglob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        commit = (doc.get("environment") or {}).get("git_commit") if isinstance(doc, dict) else None
        if commit:
            found.add(commit)
    return found


def check(root: Path | str) -> list[dict]:
    """Per results folder under ``root``: the newest commit its JSON records, the later commits that
    changed the code it measured (MEASURED_CODE), and whether its README says which commit the
    figures are from (names one of those commits, and the machine). ``ok`` is False for a folder
    that is stale and does not say so."""
    root = Path(root)
    repo = Path(_git(root, "rev-parse", "--show-toplevel") or root)
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "README.md").is_file()):
        readme = (folder / "README.md").read_text()
        named = set(re.findall(r"\b[0-9a-f]{7,40}\b", readme))
        commits = producing_commits(folder)
        row = {"folder": folder.name, "commit": None, "changes": [], "labelled": False}
        if not commits:  # nothing recorded: the README must name the commit itself
            labelled = bool(named) and bool(re.search(r"\b[Mm]achine\b", readme))
            row.update(status="no commit recorded in its JSON", labelled=labelled, ok=labelled)
            rows.append(row)
            continue
        known = [c for c in commits if _git(repo, "cat-file", "-e", f"{c}^{{commit}}") is not None]
        if not known:
            row.update(
                status=f"its commits are not in this history: {', '.join(sorted(c[:10] for c in commits))}"
            )
            row.update(ok=False)
            rows.append(row)
            continue
        newest = max(known, key=lambda c: int(_git(repo, "rev-list", "--count", c) or 0))
        changes = (
            _git(repo, "log", "--format=%h %s", f"{newest}..HEAD", "--", *MEASURED_CODE) or ""
        ).splitlines()
        labelled = bool(re.search(r"\b[Mm]achine\b", readme)) and any(
            c.startswith(n) for n in named for c in commits
        )
        row.update(commit=newest[:10], changes=changes, labelled=labelled)
        if not changes:
            row.update(status="current", ok=True)
        else:
            row.update(
                status=f"predates {len(changes)} change(s) to {', '.join(MEASURED_CODE)} (latest: {changes[0][:70]})",
                ok=labelled,
            )
        rows.append(row)
    return rows
