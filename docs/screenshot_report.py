"""Screenshot an `align report` page in headless Chromium, to look at it as a reader does.

    python docs/screenshot_report.py runs/demo            # align report runs/demo, then runs/demo/report/report.png
    python docs/screenshot_report.py runs/demo/dpo -o dpo.png --height 3200

Needs Debian's chromium (`apt-get install -y chromium`); it runs offline with the flags that keep it from reaching
for the network. Exit 2 with a message when Chromium is missing or the target has no report.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="a run or pipeline directory")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: TARGET/report/report.png)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium is not installed (apt-get install -y chromium)", file=sys.stderr)
        return 2
    made = subprocess.run([sys.executable, "-m", "align", "report", str(args.target)], capture_output=True, text=True)
    if made.returncode:
        print(made.stderr.strip(), file=sys.stderr)
        return made.returncode
    page = args.target / "report" / "report.html"
    output = (args.output or args.target / "report" / "report.png").resolve()
    with tempfile.TemporaryDirectory(prefix="align-chromium-") as profile:
        shot = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={output}",
                               f"--window-size={args.width},{args.height}", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    if shot.returncode or not output.is_file():
        print(f"chromium failed ({shot.returncode}): {shot.stderr[-1000:]}", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
