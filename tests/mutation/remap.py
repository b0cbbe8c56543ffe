"""Move ``equivalent.txt``'s line numbers across an edit, so its entries keep naming their lines.

    .venv/bin/python -m tests.mutation.remap             # from HEAD to the working tree
    .venv/bin/python -m tests.mutation.remap --base REV  # from REV to the working tree

An entry names a mutant by module, line and mutated text.  An edit above a line shifts it;
this reads ``git diff -U0`` of each module the file names and moves every entry whose line
the edit left as it was.  An entry whose line the edit changed or removed is left as it is
and listed: its mutant may be gone, or may need a new reason (rerun the group).  Exit 1 when
any entry is listed, else 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from tests.mutation.report import ROOT
from tests.mutation.run import git

EQUIVALENT: Final = ROOT / "tests" / "mutation" / "equivalent.txt"
_HUNK: Final = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", re.MULTILINE)


def hunks(base: str, module: str) -> list[tuple[int, int, int, int]]:
    """``(old_start, old_count, new_start, new_count)`` of each hunk from ``base`` to the tree."""
    diff = git("diff", "-U0", base, "--", module)
    return [
        (int(a), int(b) if b else 1, int(c), int(d) if d else 1)
        for a, b, c, d in _HUNK.findall(diff)
    ]


def moved(line: int, edits: Sequence[tuple[int, int, int, int]]) -> int | None:
    """Where old ``line`` is now, or ``None`` when an edit changed or removed it."""
    for old_start, old_count, _, _ in edits:
        if old_count and old_start <= line < old_start + old_count:
            return None
    return line + total_shift(line, edits)


def total_shift(line: int, edits: Sequence[tuple[int, int, int, int]]) -> int:
    """Lines added minus lines removed by the edits above old ``line``."""
    total = 0
    for old_start, old_count, _, new_count in edits:
        # A pure insertion (no old lines) goes after old_start; an edit replaces from it.
        first = old_start + 1 if old_count == 0 else old_start
        if line >= first + old_count:
            total += new_count - old_count
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the revision the line numbers are of")
    args = parser.parse_args(argv)
    lines = EQUIVALENT.read_text().splitlines(keepends=True)
    edits: dict[str, list[tuple[int, int, int, int]]] = {}
    out: list[str] = []
    stale: list[str] = []
    moves = 0
    for text in lines:
        if text.startswith("#") or " | " not in text:
            out.append(text)
            continue
        module, number, rest = text.split(" | ", 2)
        if module not in edits:
            edits[module] = hunks(args.base, module) if Path(ROOT, module).exists() else []
        now = moved(int(number), edits[module])
        if now is None:
            stale.append(text.rstrip("\n"))
            out.append(text)
            continue
        moves += now != int(number)
        out.append(f"{module} | {now} | {rest}")
    EQUIVALENT.write_text("".join(out))
    print(f"{moves} entries moved; {len(stale)} on a changed line (left as they were):")
    for text in stale:
        print(f"  {text}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
