"""Mutation score of the decision code, from mutmut's results, less the known-equivalent mutants.

    .venv/bin/python -m tests.mutation.run     # every group, each in its own worktree, scored here
    .venv/bin/mutmut run --max-children 1     # or by hand: [tool.mutmut] in pyproject.toml
    .venv/bin/python -m tests.mutation.report  # scores per module; exit 1 if a mutant survives
    .venv/bin/python -m tests.mutation.report --root DIR  # the results of a run made in DIR

A survivor is a mutant the tests let through ("survived") or never ran ("no tests").  One listed
in ``equivalent.txt`` (``module | line | mutated line | why``, matched on module, line and the
mutated line's text) changes nothing a test could observe and is not counted.  An entry that
matches no survivor of a module the run mutated is reported as stale: its line moved, or a test
now kills it.

Not collected by pytest (no ``test_`` prefix); a mutation run takes minutes, not a test's time.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
EQUIVALENT: Final = Path(__file__).with_name("equivalent.txt")
MUTMUT: Final = Path(sys.executable).with_name("mutmut")
KILLED: Final = frozenset({"killed", "timeout", "segfault", "caught by type check"})
SURVIVED: Final = frozenset({"survived", "no tests"})


@dataclass(frozen=True)
class Mutant:
    name: str  # mutmut's, e.g. gateway.gate.xǁGateǁadmit__mutmut_11
    module: str  # gateway/gate.py
    status: str


@dataclass(frozen=True)
class Located:
    mutant: Mutant
    line: int
    before: str
    after: str


def mutmut(root: Path, *args: str) -> str:
    done = subprocess.run(  # noqa: S603 - our own venv's mutmut, fixed arguments
        [str(MUTMUT), *args], cwd=root, capture_output=True, text=True, check=True
    )
    return done.stdout


def mutants(root: Path) -> list[Mutant]:
    found = []
    for row in mutmut(root, "results", "--all", "true").splitlines():
        name, sep, status = row.strip().rpartition(": ")
        if not sep:
            continue
        dotted = name.rsplit("__mutmut_", 1)[0].rpartition(".")[0]
        found.append(Mutant(name, dotted.replace(".", "/") + ".py", status))
    return found


def function_lines(root: Path, module: str, name: str) -> tuple[int, int]:
    """First and last line of the function mutmut calls ``name`` (x_f or xǁClassǁmethod)."""
    local = name.rsplit("__mutmut_", 1)[0].rpartition(".")[2]
    wanted = local.split("ǁ")[1:] if local.startswith("xǁ") else [local[2:]]
    tree = ast.parse((root / module).read_text())
    scope: list[ast.stmt] = tree.body
    for part in wanted:
        node = next(
            n
            for n in scope
            if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.name == part
        )
        scope = node.body
    assert node.end_lineno is not None
    return node.lineno, node.end_lineno


def locate(root: Path, mutant: Mutant) -> Located:
    """The source line a mutant changes, as it was and as the mutant has it."""
    diff = mutmut(root, "show", mutant.name).splitlines()
    removed = [d[1:] for d in diff if d.startswith("-") and not d.startswith("---")]
    added = [d[1:] for d in diff if d.startswith("+") and not d.startswith("+++")]
    first, last = function_lines(root, mutant.module, mutant.name)
    source = (root / mutant.module).read_text().splitlines()
    before = removed[0] if removed else ""
    line = next(
        (n for n in range(first, last + 1) if source[n - 1].strip() == before.strip()), first
    )
    return Located(mutant, line, before.strip(), added[0].strip() if added else "")


def equivalents() -> dict[tuple[str, int, str], str]:
    listed = {}
    for raw in EQUIVALENT.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        # The mutated line may itself hold " | " (a `str | None` annotation): the module and
        # line come first, the reason last, and whatever lies between is the mutated line.
        # The mutated line may also be empty (an argument deleted): split before stripping.
        module, line, rest = raw.split(" | ", 2)
        after, why = rest.rsplit(" | ", 1)
        listed[module.strip(), int(line), after.strip()] = why.strip()
    return listed


def score(root: Path = ROOT, modules: Collection[str] | None = None) -> int:
    """Print the score of each module mutmut's results in ``root`` cover (only ``modules``, when
    given) and every survivor not listed as equivalent; 0 if there is none, 1 if there is, 2 if
    there are no results."""
    everything = [m for m in mutants(root) if modules is None or m.module in modules]
    if not everything:
        print(f"no mutmut results in {root}: run `.venv/bin/mutmut run` first", file=sys.stderr)
        return 2
    scored = {m.module for m in everything}
    listed = equivalents()
    used: set[tuple[str, int, str]] = set()
    survivors: list[Located] = []
    equivalent: Counter[str] = Counter()
    for mutant in everything:
        if mutant.status not in SURVIVED:
            continue
        where = locate(root, mutant)
        key = (mutant.module, where.line, where.after)
        if key in listed:
            used.add(key)
            equivalent[mutant.module] += 1
        else:
            survivors.append(where)
    unknown = [m for m in everything if m.status not in KILLED | SURVIVED]
    for module in sorted(scored):
        mine = [m for m in everything if m.module == module]
        killed = sum(m.status in KILLED for m in mine)
        counted = len(mine) - equivalent[module]
        print(
            f"{module}: {len(mine)} mutants, {killed} killed, {equivalent[module]} equivalent, "
            f"{counted - killed} not killed; score {100 * killed / max(counted, 1):.1f}%"
        )
    for where in survivors:
        print(f"  SURVIVED {where.mutant.module}:{where.line}  {where.before}  ->  {where.after}")
        print(f"           ({where.mutant.status}; `mutmut show {where.mutant.name}`)")
    for mutant in unknown:
        print(f"  {mutant.status.upper()} {mutant.name}")
    for key in sorted(set(listed) - used):
        if key[0] in scored:  # entries of modules this run did not mutate are not judged
            print(f"  stale equivalent.txt entry (no such survivor): {key[0]}:{key[1]}  {key[2]}")
    return 1 if survivors or unknown else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="where mutmut ran (default: this checkout)"
    )
    return score(parser.parse_args(argv).root.resolve())


if __name__ == "__main__":
    sys.exit(main())
