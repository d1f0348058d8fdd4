"""Screenshot a demo's report.html in headless Chromium (docs/img/report-*.png).

    python scripts/screenshot_report.py runs/demo/report.html docs/img/report-quick.png [--height 2400]

Needs Playwright's Python package (`pip install -e ".[label-test]"`) and a Chromium: Debian's
/usr/bin/chromium when present, else Playwright's own (`playwright install chromium`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a report.html written by `alignkit demo`")
    ap.add_argument("out", help="PNG file to write")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=0, help="clip the full page to this many pixels (0: all)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium) if chromium else p.chromium.launch()
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        page.goto(Path(args.report).resolve().as_uri())
        page.wait_for_load_state("networkidle")
        full = page.evaluate("document.documentElement.scrollHeight")
        height = min(full, args.height) if args.height else full
        page.screenshot(path=args.out, full_page=True, clip={"x": 0, "y": 0, "width": args.width, "height": height})
        browser.close()
    print(f"wrote {args.out} ({args.width}x{height} of a {full}-pixel page)")


if __name__ == "__main__":
    main()
