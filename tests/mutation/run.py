"""Mutation testing of every security-critical module, group by group, then the score of each.

    .venv/bin/python -m tests.mutation.run                    # every group, one after the other
    .venv/bin/python -m tests.mutation.run --group jwks       # one group (--group may repeat)
    .venv/bin/python -m tests.mutation.run --list             # the groups and their tests
    .venv/bin/python -m tests.mutation.run --group jwks --keep  # keep the worktree for `mutmut show`

Each group runs in its own scratch git worktree (under the system temp dir) holding this
checkout's files as they are now: HEAD, plus modified and untracked files copied over, less
deleted ones (``--committed``: HEAD alone).  Its pyproject's ``[tool.mutmut]`` is rewritten to
mutate the group's modules with the group's tests, so a run never touches this checkout (its
``mutants/`` directory, its pyproject).  Then ``tests.mutation.report`` scores the group's
modules against ``equivalent.txt`` of this checkout, and the worktree is removed.

mutmut runs with ``--max-children 1`` unless told otherwise (``--max-children N``): the tests
of a group run one mutant at a time.  Exit status: 0 when no group leaves a survivor outside
``equivalent.txt``, 1 when one does, 2 when a group could not run (for instance its tests fail
before any mutation: mutmut's clean run).

Not collected by pytest (no ``test_`` prefix); a full run takes the better part of an hour.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.mutation.report import MUTMUT, ROOT, score

TEST_TIMEOUT_S: Final = 15  # per test in a mutation run (pytest-timeout)


@dataclass(frozen=True)
class Group:
    modules: tuple[str, ...]  # what mutmut mutates
    tests: tuple[str, ...]  # what it runs against each mutant (those that cover the mutant)


GROUPS: Final = {
    # The one decision both modes share, and forward-auth mode's answer.
    "gate": Group(
        ("gateway/gate.py", "gateway/forward_auth.py"),
        (
            "tests/unit/test_handler.py",
            "tests/integration/test_forward_auth.py",
            "tests/integration/test_policy.py",
            "tests/integration/test_auth_flow.py",
            "tests/integration/test_proxy_flow.py",
            # The gate's sender-check and span branches are decided by these.
            "tests/integration/test_dpop.py",
            "tests/integration/test_cert_bound.py",
            "tests/integration/test_tracing.py",
        ),
    ),
    # What reaches the verifier, which keys count, which headers go out, who gets in.
    "routing": Group(
        (
            "gateway/routing.py",
            "gateway/extractor.py",
            "gateway/claims.py",
            "gateway/keyset.py",
            "gateway/admission.py",
        ),
        (
            "tests/unit/test_routing.py",
            "tests/unit/test_extractor.py",
            "tests/unit/test_claims.py",
            "tests/unit/test_keyset.py",
            "tests/unit/test_admission.py",
        ),
    ),
    # One token against a route's policy, and the verified tokens kept until exp.
    "verifier": Group(
        ("gateway/verifier.py", "gateway/token_cache.py"),
        ("tests/unit/test_verifier.py", "tests/unit/test_token_cache.py"),
    ),
    # The client-facing listener: framing, pipelining, refusals, limits, the header-policy sets.
    "server": Group(
        ("gateway/server.py", "gateway/headers.py", "gateway/tunnel.py"),
        (
            "tests/integration/test_http_server.py",
            "tests/integration/test_hop_edges.py",
            "tests/integration/test_backpressure.py",
            "tests/integration/test_limits.py",
            "tests/integration/test_attacks.py",
            "tests/integration/test_websocket.py",
            "tests/integration/test_failing_neighbours.py",
            "tests/integration/test_large_bodies.py",
            "tests/integration/test_shutdown.py",
            "tests/unit/test_middleware.py",
            "tests/unit/test_tunnel.py",
            "tests/integration/test_proxy_flow.py",
            "tests/unit/test_proxy.py",
            "tests/unit/test_claims.py",
            "tests/unit/test_build.py",
            "tests/unit/test_local_authority.py",
            "tests/integration/test_listener_tls.py",
            "tests/integration/test_cert_bound.py",
            "tests/integration/test_forward_auth.py",
            "tests/integration/test_upstream_pool.py",
            "tests/integration/test_dpop.py",
        ),
    ),
    # The upstream hop: what the upstream is sent (stripped, injected, framed), its pool and
    # deadlines, and what comes back to the client.
    "proxy": Group(
        ("gateway/proxy.py", "gateway/upstream.py"),
        (
            "tests/unit/test_proxy.py",
            "tests/unit/test_upstream.py",
            "tests/integration/test_proxy_flow.py",
            "tests/integration/test_upstream_pool.py",
            "tests/integration/test_hop_edges.py",
            "tests/integration/test_backpressure.py",
            "tests/integration/test_upstream_tls.py",
            "tests/integration/test_failing_neighbours.py",
            "tests/integration/test_large_bodies.py",
            "tests/integration/test_limits.py",
            "tests/integration/test_websocket.py",
            "tests/integration/test_attacks.py",
            "tests/integration/test_tracing.py",
            # A route's prefix rewrite and a query token's removal from the forwarded target.
            "tests/integration/test_policy.py",
            # A chunked body that turns malformed mid-upload (the reason its refusal carries).
            "tests/integration/test_http_server.py",
            # The pools closed by a shutdown (UpstreamPools.closed).
            "tests/integration/test_shutdown.py",
        ),
    ),
    # W3C trace context (which traceparent is continued, started, forwarded) and the spans.
    "tracing": Group(
        ("gateway/tracing.py",),
        ("tests/unit/test_tracing.py", "tests/integration/test_tracing.py"),
    ),
    # Sender-constrained tokens: DPoP proofs, the replay cache and nonces, and each binding.
    "binding": Group(
        ("gateway/dpop.py", "gateway/binding.py"),
        (
            "tests/unit/test_dpop.py",
            "tests/unit/test_binding.py",
            "tests/integration/test_dpop.py",
            "tests/integration/test_cert_bound.py",
        ),
    ),
    # The per-issuer key cache: discovery, cooldown, stale-while-revalidate, refresh, backoff.
    "jwks": Group(
        ("gateway/jwks.py",),
        (
            "tests/unit/test_jwks.py",
            "tests/integration/test_key_lifecycle.py",
            "tests/integration/test_keys_flow.py",
        ),
    ),
}

PYTEST_ARGS: Final = ("-p", "no:cacheprovider", "-p", "no:unraisableexception")
_SECTION: Final = re.compile(r"^\[tool\.mutmut\]\n.*?(?=^\[)", re.MULTILINE | re.DOTALL)


def mutmut_section(group: Group) -> str:
    """The ``[tool.mutmut]`` section that makes a plain ``mutmut run`` run ``group``."""

    def array(items: Sequence[str]) -> str:
        return "[\n" + "".join(f'    "{item}",\n' for item in items) + "]"

    return (
        "[tool.mutmut]\n"
        "# Written by tests/mutation/run.py for this scratch worktree.\n"
        'source_paths = ["gateway/"]\n'
        f"only_mutate = {array(group.modules)}\n"
        f"pytest_add_cli_args_test_selection = {array(group.tests)}\n"
        f"pytest_add_cli_args = {array(PYTEST_ARGS)}\n\n"
    )


def with_section(pyproject: str, section: str) -> str:
    """``pyproject`` with its ``[tool.mutmut]`` section replaced by ``section``."""
    replaced, count = _SECTION.subn(lambda _: section, pyproject, count=1)
    if count != 1:
        raise SystemExit("pyproject.toml has no [tool.mutmut] section followed by another one")
    tomllib.loads(replaced)  # still valid TOML
    return replaced


def checkout_group() -> str | None:
    """The group this checkout's own ``[tool.mutmut]`` runs (a ``mutmut run`` by hand), if any."""
    section = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    for name, group in GROUPS.items():
        if (
            tuple(section.get("only_mutate", ())) == group.modules
            and tuple(section.get("pytest_add_cli_args_test_selection", ())) == group.tests
        ):
            return name
    return None


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(  # noqa: S603 - git with fixed arguments
        ["git", *args],  # noqa: S607 - git from PATH, as a developer runs it
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def make_worktree(name: str, *, committed: bool) -> Path:
    """A scratch worktree of HEAD, with this checkout's uncommitted files unless ``committed``."""
    where = Path(tempfile.mkdtemp(prefix=f"mutation-{name}-"))
    where.rmdir()  # git worktree add wants to create it
    git("worktree", "add", "--detach", str(where), "HEAD")
    if not committed:
        listed = git("ls-files", "-z", "--modified", "--others", "--exclude-standard")
        for path in sorted({p for p in listed.split("\0") if p}):
            source, target = ROOT / path, where / path
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            elif not source.exists():  # deleted here, not yet in a commit
                target.unlink(missing_ok=True)
    return where


def remove_worktree(where: Path) -> None:
    git("worktree", "remove", "--force", str(where))


def run_group(name: str, *, max_children: int, committed: bool, keep: bool) -> int:
    """Mutate one group in a scratch worktree and print its score; the score's exit status."""
    group = GROUPS[name]
    where = make_worktree(name, committed=committed)
    print(f"== {name}: {', '.join(group.modules)} (worktree {where})", flush=True)
    try:
        pyproject = where / "pyproject.toml"
        pyproject.write_text(with_section(pyproject.read_text(), mutmut_section(group)))
        # mutmut redraws a progress line per mutant: its output goes to a log, not the terminal.
        log = Path(tempfile.gettempdir()) / f"mutation-{name}.log"
        with log.open("w") as out:
            done = subprocess.run(  # noqa: S603 - our own venv's mutmut, fixed arguments
                [str(MUTMUT), "run", "--max-children", str(max_children)],
                cwd=where,
                # A mutant that hangs a test fails that test here (pytest-timeout), as a
                # hang should, instead of holding a worker for mutmut's wall timeout (up to
                # minutes per mutant). The longest test of any group takes about 6 s.
                env={**os.environ, "PYTEST_TIMEOUT": str(TEST_TIMEOUT_S)},
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            print(f"== {name}: mutmut run failed (exit {done.returncode}); see {log}")
            return 2
        return score(where, group.modules)
    finally:
        if keep:
            print(f"== {name}: kept {where}; `git worktree remove --force {where}` when done")
        else:
            remove_worktree(where)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run mutmut over each group of security-critical modules and score it."
    )
    parser.add_argument(
        "--group", action="append", choices=sorted(GROUPS), help="run only this group (repeatable)"
    )
    parser.add_argument("--max-children", type=int, default=1, help="mutmut's parallel workers")
    parser.add_argument(
        "--committed", action="store_true", help="mutate HEAD, without uncommitted changes"
    )
    parser.add_argument("--keep", action="store_true", help="keep each worktree after its run")
    parser.add_argument("--list", action="store_true", help="print the groups and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, group in GROUPS.items():
            print(f"{name}: {' '.join(group.modules)}")
            print(f"    tests: {' '.join(group.tests)}")
        mine = checkout_group()
        print(f"pyproject.toml's [tool.mutmut] (a run by hand): {mine or 'no group of these'}")
        return 0
    worst = 0
    for name in args.group or list(GROUPS):
        status = run_group(
            name, max_children=args.max_children, committed=args.committed, keep=args.keep
        )
        worst = max(worst, status)
    return worst


if __name__ == "__main__":
    sys.exit(main())
