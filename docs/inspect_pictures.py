"""Make the README's inspect pictures from a `minigpt inspect` page: a screenshot of the shaded text
and the attention view, with one token hovered (needs Playwright and Chromium).

    python docs/inspect_pictures.py /tmp/shakes-inspect/inspect.html docs/inspect-page.png [TOKEN]
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(page_path: str, out: str, token: int = 20) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700}, device_scale_factor=1)
            page.goto(Path(page_path).resolve().as_uri())
            page.hover(f"#tokens .tok >> nth={token}")
            top = page.locator("h1").bounding_box()["y"]
            bottom = page.locator("#tokens").bounding_box()
            page.screenshot(path=out, clip={"x": 0, "y": top, "width": 900,
                                            "height": bottom["y"] + bottom["height"] + 8 - top})
        finally:
            browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
