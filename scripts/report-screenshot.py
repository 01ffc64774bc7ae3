"""A screenshot of a results folder's HTML page in headless Chromium (the README's picture):
  .venv/bin/python scripts/report-screenshot.py reports/ladder-cpu docs/report-ladder-cpu.png
Renders the page first (bench report DIR --html); needs chromium + chromium-driver (scripts/setup.sh)."""

import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from bench.harness import report

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
page = report.render_html(folder)
opts = webdriver.ChromeOptions()
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900", "--hide-scrollbars"):
    opts.add_argument(arg)
browser = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
try:
    browser.get(page.resolve().as_uri())
    browser.save_screenshot(str(out))
finally:
    browser.quit()
print(out)
