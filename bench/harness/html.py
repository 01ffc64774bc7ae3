"""The HTML renderer: one self-contained page per results folder (`bench report DIR` writes it beside
README.md as index.html) and per comparison (`bench compare A B --html FILE`).

Self-contained: styles, the sorting script and the charts (plain SVG) are inline, the folder's PNGs
are embedded, nothing is fetched. The page holds the folder's README.md as HTML (the same tables,
sortable), interactive charts drawn from the results of record (hover: the exact figure, min-max,
trials, command; click: the JSON that made it) and an index of every result with its machine,
commit and command."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from pathlib import Path

from loaders.stored import write_atomic

from .result import Result

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:0 auto;max-width:1400px;padding:0 24px 48px;color:#222}
h1{font-size:1.6em;margin:.8em 0 .3em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:12.5px;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f5f7;cursor:pointer;user-select:none;white-space:nowrap}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fafbfc}code,pre{font:12px ui-monospace,"DejaVu Sans Mono",monospace}
pre{background:#f6f8fa;padding:8px;overflow-x:auto}img{max-width:100%}
.chart{margin:1em 0}.chart svg{max-width:100%;height:auto}.chart a:hover rect,.chart a:hover circle{opacity:.7}
nav{font-size:13px;color:#555}nav a{margin-right:1em}.meta{color:#555;font-size:12.5px}
"""

# Click a header: sort its table by that column (numbers by value, "-" and blanks last; again: reverse).
SCRIPT = """
(function(){
function key(cell){var s=cell.textContent.trim().replace(/,/g,'');var m=s.match(/^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?/i);
 return m?parseFloat(m[0]):(s===''||s==='-'||s==='n/a'?null:s.toLowerCase());}
function sort(table,i,th){var body=table.tBodies[0];if(!body)return;var rows=Array.prototype.slice.call(body.rows);
 var asc=th.getAttribute('data-dir')!=='asc';
 rows.sort(function(a,b){var x=key(a.cells[i]||a),y=key(b.cells[i]||b);
  if(x===null&&y===null)return 0;if(x===null)return 1;if(y===null)return -1;
  var c=(typeof x===typeof y)?(x<y?-1:x>y?1:0):(typeof x==='number'?-1:1);return asc?c:-c;});
 rows.forEach(function(r){body.appendChild(r);});
 Array.prototype.forEach.call(table.querySelectorAll('th'),function(h){h.removeAttribute('data-dir');});
 th.setAttribute('data-dir',asc?'asc':'desc');}
Array.prototype.forEach.call(document.querySelectorAll('table'),function(t){
 Array.prototype.forEach.call(t.querySelectorAll('thead th'),function(th,i){th.title='click to sort';
  th.addEventListener('click',function(){sort(t,i,th);});});});
})();
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v, spec=",.1f") -> str:
    return "-" if v is None else format(v, spec)


# -- markdown ---------------------------------------------------------------------------------------


def markdown_html(text: str, folder: Path) -> str:
    """README.md as HTML (GitHub's table syntax), its local images embedded as data URIs."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)

    def embed(m):
        src = html.unescape(m.group(1))
        path = folder / src
        if "://" in src or not path.is_file() or path.suffix.lower() not in (".png", ".svg", ".jpg"):
            return m.group(0)
        kind = (
            "svg+xml"
            if path.suffix.lower() == ".svg"
            else path.suffix.lower().lstrip(".").replace("jpg", "jpeg")
        )
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/{kind};base64,{data}"'

    return re.sub(r'src="([^"]+)"', embed, body)


# -- charts -------------------------------------------------------------------------------------------


def _ticks(vmax: float) -> list[float]:
    """Round axis ticks from 0 to at least ``vmax`` (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    raw = (vmax or 1) / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [step * k for k in range(math.ceil(vmax / step - 1e-9) + 1)]


def _bars(title: str, xlabel: str, rows: list[dict]) -> str:
    """Horizontal bars, one per row {label, value, lo, hi, tip, href}: the median as a bar, the
    min-max as a whisker; the row's tooltip and link on the bar."""
    if not rows:
        return ""
    width, left, bar_h, top = 900, 330, 18, 34
    height = top + len(rows) * (bar_h + 8) + 40
    ticks = _ticks(max(max(r["hi"] if r.get("hi") is not None else r["value"], r["value"]) for r in rows))
    scale = (width - left - 130) / ticks[-1]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{left}" y="20" font-size="15" font-weight="bold">{_e(title)}</text>',
    ]
    for i, r in enumerate(rows):
        y = top + i * (bar_h + 8)
        w = max(1.0, r["value"] * scale)
        colour = r.get("colour", PALETTE[0])
        out.append(
            f'<text x="{left - 6}" y="{y + 13}" font-size="12" text-anchor="end">{_e(r["label"][:48])}</text>'
        )
        whisker = ""
        if r.get("lo") is not None and r.get("hi") is not None:
            x0, x1 = left + r["lo"] * scale, left + r["hi"] * scale
            whisker = (
                f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{y + bar_h / 2}" y2="{y + bar_h / 2}" stroke="#222"/>'
                f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{y + 4}" y2="{y + bar_h - 4}" stroke="#222"/>'
                f'<line x1="{x1:.1f}" x2="{x1:.1f}" y1="{y + 4}" y2="{y + bar_h - 4}" stroke="#222"/>'
            )
        shape = (
            f'<g class="bar" data-value="{r["value"]}"><title>{_e(r["tip"])}</title>'
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>{whisker}'
            f'<text x="{left + max(w, (r.get("hi") or 0) * scale) + 5:.1f}" y="{y + 13}" font-size="11">'
            f"{_e(r.get('text', _fmt(r['value'])))}</text></g>"
        )
        out.append(f'<a href="{_e(r["href"])}">{shape}</a>' if r.get("href") else shape)
    axis_y = top + len(rows) * (bar_h + 8) + 4
    out.append(
        f'<line x1="{left}" x2="{left + ticks[-1] * scale}" y1="{axis_y}" y2="{axis_y}" stroke="#888"/>'
    )
    for v in ticks:
        x = left + v * scale
        out.append(f'<text x="{x:.1f}" y="{axis_y + 15}" font-size="11" text-anchor="middle">{v:,.0f}</text>')
    out.append(
        f'<text x="{left + ticks[-1] * scale / 2}" y="{axis_y + 32}" font-size="12" text-anchor="middle">'
        f"{_e(xlabel)}</text></svg>"
    )
    return f'<div class="chart">{"".join(out)}</div>'


def _lines(title: str, xlabel: str, ylabel: str, series: dict[str, list[dict]], hline=None) -> str:
    """Lines of points {x, y, tip, href} per series name; ``hline``: (y, label) drawn across."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    width, height, left, right, top, bottom = 900, 420, 70, 200, 34, 50
    xs = [p["x"] for p in pts]
    ticks = _ticks(max([p["y"] for p in pts] + ([hline[0]] if hline else [])))
    ymax = ticks[-1]
    xmin, xmax = min(xs), max(xs)
    xspan = (xmax - xmin) or 1
    px = lambda x: left + (x - xmin) / xspan * (width - left - right)  # noqa: E731
    py = lambda y: top + (1 - y / ymax) * (height - top - bottom)  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{left}" y="20" font-size="15" font-weight="bold">{_e(title)}</text>',
        f'<line x1="{left}" x2="{width - right}" y1="{py(0)}" y2="{py(0)}" stroke="#888"/>',
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{py(0)}" stroke="#888"/>',
    ]
    for v in ticks:
        out.append(
            f'<text x="{left - 6}" y="{py(v) + 4:.1f}" font-size="11" text-anchor="end">{v:,.0f}</text>'
        )
    for x in sorted(set(xs)):
        out.append(
            f'<text x="{px(x):.1f}" y="{py(0) + 15:.1f}" font-size="11" text-anchor="middle">{x:g}</text>'
        )
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" font-size="12" text-anchor="middle">{_e(xlabel)}</text>'
        f'<text x="14" y="{(top + height - bottom) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{_e(ylabel)}</text>'
    )
    if hline:
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{py(hline[0]):.1f}" y2="{py(hline[0]):.1f}" '
            f'stroke="#444" stroke-dasharray="5 4"><title>{_e(hline[1])}</title></line>'
        )
    for i, (name, s) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        s = sorted(s, key=lambda p: p["x"])
        path = " ".join(f"{px(p['x']):.1f},{py(p['y']):.1f}" for p in s)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for p in s:
            dot = (
                f'<g class="point" data-value="{p["y"]}"><title>{_e(p["tip"])}</title>'
                f'<circle cx="{px(p["x"]):.1f}" cy="{py(p["y"]):.1f}" r="5" fill="{colour}"/></g>'
            )
            out.append(f'<a href="{_e(p["href"])}">{dot}</a>' if p.get("href") else dot)
        ly = top + 10 + i * 18
        out.append(
            f'<rect x="{width - right + 15}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{width - right + 32}" y="{ly + 1}" font-size="12">{_e(name[:26])}</text>'
        )
    out.append("</svg>")
    return f'<div class="chart">{"".join(out)}</div>'


def _tip(r: Result) -> str:
    return (
        f"command: {' '.join(r.command)}\ncommit {(r.environment.get('git_commit') or '?')[:10]}, {r.created}"
    )


def configurations_chart(results: dict[str, Result]) -> str:
    """Images/s of every configuration measured: median bar, min-max whisker, trials."""
    from .report import groups_of, regime_of

    rows = []
    paths = {id(r): p for p, r in results.items()}
    for sig, g in sorted(groups_of(results).items(), key=lambda kv: str(kv[0])):
        label, mode, loader, opts, *_ = sig
        ips = g.ips
        first = g.runs[0]
        opts_txt = ", ".join(f"{k}={v}" for k, v in json.loads(opts).items())
        name = " ".join(
            x for x in (label or loader, mode, regime_of(first) if regime_of(first) != "warm" else "") if x
        )
        med = statistics.median(ips)
        rows.append(
            {
                "label": name,
                "value": med,
                "lo": min(ips),
                "hi": max(ips),
                "href": paths[id(first)],
                "tip": f"{name} ({opts_txt or 'defaults'})\n{med:,.1f} img/s median, {min(ips):,.1f} - "
                f"{max(ips):,.1f} over {len(ips)} trial(s)\n{_tip(first)}",
                "colour": PALETTE[1] if first.loader_only else PALETTE[0],
            }
        )
    return _bars(
        "Images/s of every configuration (median; whisker: min-max; orange: loader only)", "images/s", rows
    )


def ladder_chart(sweep: dict, folder: Path, results: dict[str, Result]) -> str:
    from .report import ladder

    paths = {id(r): p for p, r in results.items()}
    rows = []
    for r in ladder(sweep, folder, results):
        if r.status != "ok" or r.ips is None:
            continue
        first = r.trials[0]
        extra = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("marginal", None if r.marginal is None else f"{r.marginal:.2f}x"),
                ("cumulative", None if r.cumulative is None else f"{r.cumulative:.2f}x"),
                ("data wait", None if r.data_wait is None else f"{r.data_wait:.0%}"),
                ("of ceiling", None if r.ceiling_pct is None else f"{r.ceiling_pct:.0%}"),
            )
            if v is not None
        )
        rows.append(
            {
                "label": r.key,
                "value": r.ips,
                "lo": r.ips_min,
                "hi": r.ips_max,
                "href": paths.get(id(first)),
                "text": f"{r.ips:,.1f}" + ("" if r.cumulative is None else f"  ({r.cumulative:.2f}x)"),
                "tip": f"{r.key}: {r.title}\n{r.ips:,.1f} img/s median, {r.ips_min:,.1f} - {r.ips_max:,.1f} over "
                f"{len(r.trials)} trial(s)\n{extra}\n{_tip(first)}",
                "colour": PALETTE[2] if r.kept else PALETTE[0],
            }
        )
    return _bars("The techniques ladder: images/s per step (green: kept)", "images/s, end to end", rows)


def workers_chart(results: dict[str, Result]) -> str:
    from .report import workers_series

    lines = {}
    for name, by in workers_series(results).items():
        lines[name] = []
        for w, runs in by.items():
            ips = [r.ips for _, r in runs]
            lines[name].append(
                {
                    "x": w,
                    "y": statistics.median(ips),
                    "href": runs[0][0],
                    "tip": f"{name}, {w} workers: {statistics.median(ips):,.1f} img/s median, {min(ips):,.1f} - "
                    f"{max(ips):,.1f} over {len(ips)} trial(s)\n{_tip(runs[0][1])}",
                }
            )
    return _lines("Throughput against workers / threads", "workers / threads", "images/s (median)", lines)


def plan_chart(path: Path, folder: Path) -> str:
    """A plan's measured loader curves (images/s against cores) and the rate the target needs."""
    doc = json.loads(path.read_text())
    rel = str(path.relative_to(folder))
    series = {}
    for name, c in (doc.get("measured", {}).get("loaders") or {}).items():
        series[name] = [
            {
                "x": k,
                "y": v,
                "href": rel,
                "tip": f"{name} alone at {k} core(s): {v:,.1f} img/s (measured)\n{rel}",
            }
            for k, v in zip(c["cores"], c["ips"])
        ]
    model = (doc.get("measured") or {}).get("model")
    if model:
        series[f"{doc['spec']['model']} on the CPU"] = [
            {"x": k, "y": v, "href": rel, "tip": f"the model at {k} core(s): {v:,.1f} img/s\n{rel}"}
            for k, v in zip(model["cores"], model["ips"])
        ]
    t = doc.get("target") or {}
    hline = (
        (t["gpu_rate"], f"one GPU's rate ({t.get('gpu_source')}): {t['gpu_rate']:,.0f} img/s")
        if t.get("gpu_rate")
        else None
    )
    return _lines(
        f"{rel}: each loader alone against cores (the crossover's measurements)",
        "cores",
        "images/s",
        series,
        hline,
    )


# -- the page -----------------------------------------------------------------------------------------


def results_index(results: dict[str, Result]) -> str:
    head = (
        "result (JSON)",
        "label",
        "loader",
        "mode",
        "ranks",
        "images/s",
        "data wait",
        "machine",
        "commit",
        "created",
        "command",
    )
    rows = []
    for p, r in sorted(results.items()):
        env = r.environment
        gpus = ", ".join(g["name"] for g in env.get("gpus") or []) or "no GPU"
        commit = (env.get("git_commit") or "?")[:10] + (" (dirty)" if env.get("git_dirty") else "")
        cells = (
            f'<a href="{_e(p)}">{_e(p)}</a>',
            _e(r.label or "-"),
            _e(r.config["loader"]),
            _e(r.mode),
            _e(r.config.get("world_size", 1)),
            _fmt(r.ips),
            "-" if r.metrics.data_wait_share is None else f"{r.metrics.data_wait_share:.0%}",
            _e(f"{env.get('cpu')}, {env.get('cpu_count')} cores, {gpus}"),
            _e(commit),
            _e(r.created),
            f"<code>{_e(' '.join(r.command))}</code>",
        )
        rows.append(f'<tr data-file="{_e(p)}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        '<table id="results"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
        f"<body>{body}<script>{SCRIPT}</script></body></html>\n"
    )


def render_folder(folder: Path, results: dict[str, Result], title: str) -> Path:
    """index.html for ``folder``: its README.md, the charts its results allow, and the index."""
    return write_atomic(folder / "index.html", folder_page(folder, results, title))


def folder_page(folder: Path, results: dict[str, Result], title: str) -> str:
    charts = []
    sweep = folder / "sweep.json"
    if sweep.is_file() and results:
        charts.append(ladder_chart(json.loads(sweep.read_text()), folder, results))
    for plan in sorted(folder.rglob("plan.json")):
        charts.append(plan_chart(plan, folder))
    if results:
        charts.append(workers_chart(results))
        charts.append(configurations_chart(results))
    charts = [c for c in charts if c]
    readme = folder / "README.md"
    text = readme.read_text() if readme.is_file() else f"# {title}\n"
    first, _, rest = text.partition("\n")
    heading = first.lstrip("# ").strip() if first.startswith("# ") else title
    nav = ['<a href="#charts">charts</a>'] if charts else []
    nav += ['<a href="#report">report</a>'] + (['<a href="#index">every result</a>'] if results else [])
    body = [
        f"<h1>{_e(heading)}</h1>",
        f"<nav>{''.join(nav)} <span class='meta'>rendered by <code>bench report</code> from README.md and the "
        "JSON results in this folder; hover a bar or point for its figures and command, click it for its "
        "JSON</span></nav>",
    ]
    if charts:
        body += ['<h2 id="charts">Charts</h2>', *charts]
    body += ['<div id="report">', markdown_html(rest if first.startswith("# ") else text, folder), "</div>"]
    if results:
        body += [
            f'<h2 id="index">Every result ({len(results)}): machine, commit and command</h2>',
            results_index(results),
        ]
    return page(heading, "\n".join(body))


def render_compare(rows: list[dict], a: str, b: str, out: Path) -> Path:
    """`bench compare A B --html OUT`: the ratio table, sortable, and the ratios as bars."""
    fmt = lambda v: "n/a" if v is None else f"{v:,.4g}"  # noqa: E731
    head = ("configuration", "metric", "A", "B", "B / A", "better", "trials A / B")
    trs = []
    bars = []
    for r in rows:
        better = "-"
        if r["ratio"] is not None:
            if r["ratio"] == 1:
                better = "="
            else:
                better = "B" if (r["ratio"] > 1) == r["higher_is_better"] else "A"
            if r["metric"] == "images/s":
                bars.append(
                    {
                        "label": r["group"],
                        "value": r["ratio"],
                        "text": f"{r['ratio']:.3f}x",
                        "tip": f"{r['group']}: images/s {fmt(r['a'])} (A) -> {fmt(r['b'])} (B), B / A = "
                        f"{r['ratio']:.3f}; trials {r['trials'][0]} / {r['trials'][1]}",
                    }
                )
        cells = (
            r["group"],
            r["metric"],
            fmt(r["a"]),
            fmt(r["b"]),
            "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}",
            better,
            f"{r['trials'][0]} / {r['trials'][1]}",
        )
        trs.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    body = [
        "<h1>bench compare</h1>",
        f"<p class='meta'>A = <code>{_e(a)}</code>, B = <code>{_e(b)}</code>; medians over each side's trials.</p>",
        _bars("images/s, B / A", "ratio (1 = equal)", bars),
        '<table id="compare"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>",
        *trs,
        "</tbody></table>",
    ]
    return write_atomic(Path(out), page(f"bench compare {a} {b}", "\n".join(body)))
