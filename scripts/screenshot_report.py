"""Open a run report in a real headless browser and save what a person would see, page by page.

    python scripts/screenshot_report.py RUN_DIR/report.html [-o OUT_DIR] [--width 1200] [--page-height 1600]

Chromium (Debian's `chromium` package: `apt-get install chromium`) renders the page offline at a tall
window size; the screenshot is cut at the end of the content and split into pages
OUT_DIR/report-1.png, report-2.png, ... (default OUT_DIR: beside the report). Prints the page files.
The report inlines its plots, so a page that renders them proves the file is self-contained.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def screenshot(report: Path, out_dir: Path, width: int = 1200, page_height: int = 1600, max_height: int = 20000) -> list[Path]:
    """Render ``report`` in headless Chromium; write and return the page PNGs."""
    from PIL import Image

    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found: apt-get install chromium")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.png"
        # --user-data-dir: a fresh profile, so nothing cached or installed changes what the page shows
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{max_height}",
                        f"--screenshot={full}", report.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        image = Image.open(full).convert("RGB")
    bottom = _content_bottom(image)
    pages = []
    for k, top in enumerate(range(0, bottom, page_height), 1):
        path = out_dir / f"{report.stem}-{k}.png"
        image.crop((0, top, width, min(top + page_height, bottom))).save(path)
        pages.append(path)
    return pages


def _content_bottom(image) -> int:
    """The last row that is not the page background (plus a margin)."""
    from PIL import Image, ImageChops

    background = image.getpixel((image.width - 1, image.height - 1))
    box = ImageChops.difference(image, Image.new("RGB", image.size, background)).getbbox()
    return min(image.height, (box[3] if box else 1) + 24)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("-o", "--out-dir", type=Path, default=None)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--page-height", type=int, default=1600)
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"screenshot_report: {args.report}: no such file", file=sys.stderr)
        return 1
    try:
        pages = screenshot(args.report, args.out_dir or args.report.parent, args.width, args.page_height)
    except (RuntimeError, subprocess.SubprocessError) as e:
        print(f"screenshot_report: {e}", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
