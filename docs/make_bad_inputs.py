"""Regenerate docs/BAD_INPUTS.md from the bad-input catalogue test, never by hand.

    python docs/make_bad_inputs.py

Runs tests/test_bad_inputs.py with ALIGN_CATALOGUE_JSON set (each case records its command, exit code and the
last line of its message) and renders the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "BAD_INPUTS.md"
HEAD = """# Bad inputs: what a user's mistake gets

Every row is a case of `tests/test_bad_inputs.py`, run on {date}: the command (paths shortened: MODEL = a local
model directory, SFT_RUN / RM_RUN = finished runs, WORK = the test's working directory), its exit code, and the last
line of the message it printed.
Each case is also asserted to print no traceback, to print its error once, and to write nothing. Regenerate with
`python docs/make_bad_inputs.py`.

| case | command | exit | message |
| --- | --- | --- | --- |
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "outcomes.json"
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_bad_inputs.py"], cwd=ROOT,
                               env={**os.environ, "ALIGN_CATALOGUE_JSON": str(target)})
        if code:
            sys.exit(f"the catalogue test failed (exit {code}); docs/BAD_INPUTS.md is not regenerated")
        outcomes = json.loads(target.read_text())
    import datetime

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [f"| {name} | `{cell(o['command'])}` | {o['exit']} | {cell(o['message'])} |" for name, o in outcomes.items()]
    PAGE.write_text(HEAD.format(date=datetime.date.today().isoformat()) + "\n".join(rows) + "\n")
    sys.stdout.write(f"{PAGE}: {len(rows)} cases\n")


if __name__ == "__main__":
    main()
