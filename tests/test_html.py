"""The HTML report: one self-contained page per results folder, with the markdown's tables (same
cells), charts that link to their JSON, and an index whose figures are the JSON's; in a real
headless Chromium it loads with no console error and its tables sort."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.harness import report
from bench.harness.result import load

REPORTS = Path(__file__).parent.parent / "reports"


class Tables(HTMLParser):
    """Every table's rows of cell texts, the tags' src/href attributes, and the index's files."""

    def __init__(self):
        super().__init__()
        self.tables, self.refs, self.files, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [(tag, a[k]) for k in ("src", "href") if k in a]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
            if "data-file" in a:
                self.files.append(a["data-file"])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, rows = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if rows is None:
                rows = []
                tables.append(rows)
            if not set(line) <= set("|-: "):
                rows.append(
                    [c.strip().replace("`", "").replace("**", "") for c in line.strip("|").split("|")]
                )
        else:
            rows = None
    return tables


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("html") / "ladder-cpu"
    shutil.copytree(REPORTS / "ladder-cpu", folder)
    (folder / "index.html").unlink(missing_ok=True)
    report.render_html(folder)
    return folder


def test_the_page_is_self_contained_and_holds_the_markdowns_tables(ladder):
    page = (ladder / "index.html").read_text()
    parsed = Tables()
    parsed.feed(page)
    for tag, ref in parsed.refs:  # nothing fetched: images inline, links only to files beside it
        assert "://" not in ref or tag == "a", (tag, ref[:80])
        if tag == "img":
            assert ref.startswith("data:image/png;base64,")
        elif not ref.startswith(("#", "data:")):
            assert (ladder / ref).is_file(), ref
    md = markdown_tables((ladder / "README.md").read_text())
    html_tables = parsed.tables[: len(md)]
    assert len(md) >= 3 and [t for t in html_tables] == md  # the same cells, in the same order
    results = report.results_in(ladder)
    assert sorted(parsed.files) == sorted(results)  # the index lists every result of the folder
    assert page.count('<g class="bar"') >= len(json.loads((ladder / "sweep.json").read_text())["steps"]) - 3


def test_bench_report_writes_the_page_beside_the_markdown_and_compare_writes_one(ladder, tmp_path):
    from bench import cli

    folder = tmp_path / "f"
    shutil.copytree(REPORTS / "foundation-cpu", folder)
    assert cli.main(["report", str(folder)]) == 0
    assert (folder / "README.md").is_file() and (folder / "index.html").stat().st_size > 1000
    out = tmp_path / "cmp.html"
    a, b = sorted((folder / "runs").glob("*.json"))[:2]
    assert cli.main(["compare", str(a), str(b), "--html", str(out)]) == 0
    parsed = Tables()
    parsed.feed(out.read_text())
    ips = [row for row in parsed.tables[0] if row[1] == "images/s"][0]
    assert ips[2] == f"{load(a).ips:,.4g}" and ips[3] == f"{load(b).ips:,.4g}"


def test_every_committed_results_folder_has_a_current_page():
    """Its index.html is what this renderer makes of its README.md and results today."""
    from bench.harness import html

    stale = []
    for folder in sorted(p for p in REPORTS.iterdir() if (p / "README.md").is_file()):
        page = folder / "index.html"
        if not page.is_file() or page.read_text() != html.folder_page(
            folder, report.results_in(folder), folder.name
        ):
            stale.append(folder.name)
    assert stale == [], f"stale or missing index.html: {stale} (bench report reports/NAME --html)"


def _chrome():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    driver = shutil.which("chromedriver")
    if driver is None or not (shutil.which("chromium") or shutil.which("google-chrome")):
        pytest.skip(
            "no headless Chromium here: scripts/setup.sh installs Debian's chromium and chromium-driver"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=opts, service=Service(driver))
    except Exception as exc:  # a driver that cannot start its browser: say so rather than skip quietly
        raise AssertionError(f"chromedriver could not start Chromium: {exc}") from exc


def test_in_chromium_it_loads_cleanly_holds_the_json_figures_and_sorts(ladder):
    browser = _chrome()
    try:
        browser.get((ladder / "index.html").as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#results tbody tr')].map("
            "r => [r.dataset.file, r.cells[5].textContent])"
        )
        results = report.results_in(ladder)
        assert len(rows) == len(results)
        for file, shown in rows:
            assert shown == f"{results[file].ips:,.1f}", file
        header = browser.find_elements("css selector", "#results thead th")[5]
        column = "return [...document.querySelectorAll('#results tbody tr')].map(r => r.cells[5].textContent)"
        header.click()
        up = [float(v.replace(",", "")) for v in browser.execute_script(column)]
        header.click()
        down = [float(v.replace(",", "")) for v in browser.execute_script(column)]
        assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) == len(rows)
        assert header.get_attribute("data-dir") == "desc"
        tip = browser.execute_script(
            "return document.querySelector('#charts ~ .chart g.bar title').textContent"
        )
        assert "img/s median" in tip and "command: bench run" in tip
    finally:
        browser.quit()


def _shallow() -> bool:
    out = subprocess.run(
        ["git", "-C", str(REPORTS), "rev-parse", "--is-shallow-repository"], capture_output=True, text=True
    )
    return out.returncode != 0 or out.stdout.strip() == "true"


def test_report_check_finds_a_stale_unlabelled_folder_and_accepts_it_once_labelled(tmp_path):
    git = lambda *a: subprocess.run(
        ["git", "-C", str(tmp_path), *a], check=True, capture_output=True, text=True
    ).stdout.strip()  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "loaders").mkdir()
    (tmp_path / "loaders" / "x.py").write_text("a = 1\n")
    git("add", "-A")
    git("commit", "-qm", "measured code")
    measured = git("rev-parse", "HEAD")
    folder = tmp_path / "reports" / "f"
    folder.mkdir(parents=True)
    (folder / "r.json").write_text(json.dumps({"environment": {"git_commit": measured}}))
    (folder / "README.md").write_text("# f\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "reports" / "docs-only").mkdir()  # a folder without README is not a results folder
    git("add", "-A")
    git("commit", "-qm", "results")
    assert [r["ok"] for r in report.check(tmp_path / "reports")] == [True]  # nothing measured changed since
    (tmp_path / "loaders" / "x.py").write_text("a = 2\n")
    git("commit", "-qam", "the loader changes")
    (row,) = report.check(tmp_path / "reports")
    assert (
        not row["ok"] and row["changes"][0].endswith("the loader changes") and row["commit"] == measured[:10]
    )
    (folder / "README.md").write_text(f"# f\n\nFigures from commit {measured[:8]}; machine: a 2-core box.\n")
    (row,) = report.check(tmp_path / "reports")
    assert row["ok"] and row["labelled"]


@pytest.mark.skipif(_shallow(), reason="a shallow clone has not the history the check reads")
def test_report_check_on_the_committed_tree_lists_nothing_unlabelled():
    from bench import cli

    assert cli.main(["report", "--check", str(REPORTS)]) == 0
