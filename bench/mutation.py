"""Mutation testing of the run-time modules, bounded in time: which small code changes no test notices.

    python bench/mutation.py                          # every module, 300 s each
    python bench/mutation.py daemon/outbox.py --budget-s 600
    nice -n 10 python bench/mutation.py models/frontend.py daemon/mqtt.py
    python bench/mutation.py daemon/mqtt.py --sample 40 --keep /tmp/mut --json before.json
    python bench/mutation.py daemon/mqtt.py --sample 40 --keep /tmp/mut --json after.json  # same 40

For each module, ``mutmut`` (2.x, the ``dev`` extra) changes one operator, constant or statement at
a time and runs that module's fast test selection (``MODULES``); a mutant no test fails on
"survives". It runs in a scratch copy of the repository (the working tree is never mutated, even if
the run is killed), with the real cries found through ``CRYID_TEST_DATA``. Each module gets a time
budget; what the budget did not reach is reported as untested. Prints, per module, the killed,
surviving and timed-out mutants, the kill rate (killed / tested) and the diff of every survivor.

``--sample N`` tests the same N mutants of each module every time: those whose sha256 of (module,
line text, index on the line) is smallest, so a before/after comparison is on one set of mutants as
long as their lines are unchanged; the others are "not sampled". ``--keep DIR`` reuses a scratch copy
and its ``.mutmut-cache``: the working tree is copied in again, and when the tests changed mutmut
re-runs every mutant that was not killed (a killed mutant stays killed, since tests were only added).

A habit, not a gate: run it after changing one of these modules, and add a test for each survivor
that is a real change of behaviour (some are equivalent mutants: same behaviour, different code).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import DATA_DIR

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRYID_TEST_DATA", DATA_DIR))

# module -> the tests that exercise it, fastest first (pytest stops at the first failure).
MODULES: dict[str, list[str]] = {
    "models/segmenter.py": ["tests/test_mutants_segmenter.py", "tests/test_segmenter.py"],
    "models/frontend.py": ["tests/test_mutants_frontend.py", "tests/test_frontend.py"],
    "daemon/identifier.py": [
        "tests/test_identifier.py",
        "tests/test_decisions_mutants.py",
        "tests/test_mutants_identifier.py",
    ],
    "daemon/outbox.py": [
        "tests/test_mutants_outbox.py",
        "tests/reliability/test_disk_full.py::test_the_outbox_keeps_the_newest_events_in_memory_and_recovers",
        "tests/test_outbox.py",
        "tests/reliability/test_state_permissions.py",
        "tests/test_mqtt.py",
        "tests/test_no_loss.py",
        "tests/reliability/test_cli_errors.py::test_damaged_outbox_is_moved_aside_and_the_daemon_starts",
    ],
    "daemon/mqtt.py": [
        "tests/test_mutants_mqtt.py",
        "tests/test_mqtt.py",
        "tests/reliability/test_mqtt_faults.py",
        "tests/test_no_loss.py",
    ],
    "enrollment/registry.py": [
        "tests/test_mutants_registry.py",
        "tests/test_registry.py",
        "tests/reliability/test_registry_replaced.py",
        "tests/test_enroll_import.py",
        "tests/reliability/test_cli_errors.py",
    ],
    "enrollment/transfer.py": [
        "tests/test_mutants_transfer.py",
        "tests/test_enroll_import.py",
        "tests/reliability/test_import_validation.py",
        "tests/test_enroll_cli.py",
    ],
}
PYTEST = "import sys, pytest; sys.exit(int(pytest.main(sys.argv[1:]) != 0))"
PACKAGES = {"daemon": "daemon", "enrollment": "enrollment", "models": "models"}  # cryid.<name> -> folder


@dataclass(frozen=True)
class Result:
    module: str
    killed: int
    survived: int
    timeout: int
    suspicious: int
    untested: int
    survivors: tuple[str, ...]  # diffs
    seconds: float
    total: int = 0  # every mutant of the module
    sampled: int = 0  # the mutants this run was asked to test (= total without --sample)

    @property
    def tested(self) -> int:
        return self.killed + self.survived + self.timeout + self.suspicious

    @property
    def caught(self) -> int:
        """Killed by a failing test (``suspicious``: killed, but slowly; a busy machine) or a time-out."""
        return self.killed + self.suspicious + self.timeout

    @property
    def kill_rate(self) -> float | None:
        """Caught over every mutant that was tested."""
        return self.caught / self.tested if self.tested else None


def scratch_copy(dest: Path) -> dict[str, str]:
    """The tracked and untracked (not ignored) files of the working tree copied to ``dest``, with an
    import shim so ``cryid.*`` loads the copy; returns the environment to run in it."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shim = dest / ".shim" / "cryid"
    shim.mkdir(parents=True, exist_ok=True)
    for name, folder in PACKAGES.items():
        if not (shim / name).is_symlink():
            (shim / name).symlink_to(dest / folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYID_")}
    env["PYTHONPATH"] = str(dest / ".shim")
    if (DATA / "metadata.csv").is_file():
        env["CRYID_TEST_DATA"] = str(DATA)
    return env


def _key(module: str, line: str, index: int) -> str:
    return hashlib.sha256(f"{module}\0{line}\0{index}".encode()).hexdigest()


def sample(module: str, n: int | None) -> list[tuple[str, int]] | None:
    """The ``n`` mutants of ``module`` (line text, index on the line) with the smallest key, or None
    for all of them."""
    from mutmut import Context, list_mutations

    if n is None:
        return None
    found = list_mutations(Context(source=(REPO / module).read_text(), filename=module))
    chosen = sorted({(m.line, m.index) for m in found}, key=lambda li: _key(module, *li))
    return chosen[:n]


# Loaded by mutmut from the scratch copy: skips every mutant that is not in the sample file.
HOOK = """import json, os
from pathlib import Path

_path = os.environ.get("CRYID_MUTATION_SAMPLE")
_chosen = None if not _path else {(line, index) for line, index in json.loads(Path(_path).read_text())}


def pre_mutation(context):
    if _chosen is not None and (context.mutation_id.line, context.mutation_id.index) not in _chosen:
        context.skip = True
"""


def _counts(
    cache: Path, module: str, chosen: list[tuple[str, int]] | None
) -> tuple[dict[str, int], list[int], int]:
    """Statuses of the module's (sampled) mutants. A status other than "killed" that was found with other
    tests than the present ones is stale and counts as untested: mutmut 2 does not always test a mutant
    on a line whose text appears twice in the module again, and would keep reporting it as a survivor."""
    db = sqlite3.connect(cache)
    try:
        rows = db.execute(
            'SELECT m.status, m.id, l.line, m."index", m.tested_against_hash FROM Mutant m '
            "JOIN Line l ON m.line = l.id JOIN SourceFile f ON l.sourcefile = f.id WHERE f.filename = ?",
            (module,),
        ).fetchall()
        found = db.execute("SELECT value FROM MiscData WHERE key = 'hash_of_tests'").fetchone()
    finally:
        db.close()
    tests_hash = found[0] if found else None
    if chosen is not None:
        wanted = set(chosen)
        rows = [r for r in rows if (r[2], r[3]) in wanted]
    final = ("ok_killed", "untested", "skipped")
    rows = [
        ("untested" if status not in final and tested != tests_hash else status, *rest)
        for status, *rest, tested in rows
    ]
    counts: dict[str, int] = {}
    for status, *_ in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts, [int(i) for s, i, *_ in rows if s == "bad_survived"], len(rows)


def run_module(work: Path, env: dict[str, str], module: str, budget_s: float, n: int | None) -> Result:
    from mutmut import Context, list_mutations

    total = len(list_mutations(Context(source=(REPO / module).read_text(), filename=module)))
    chosen = sample(module, n)
    env = dict(env)
    if chosen is not None:
        (work / "mutmut_config.py").write_text(HOOK)
        path = work / ".mutation-sample.json"
        path.write_text(json.dumps(chosen))
        env["CRYID_MUTATION_SAMPLE"] = str(path)
    cache = work / ".mutmut-cache"
    if cache.is_file():  # the baseline time is cached per cache file, not per test selection
        db = sqlite3.connect(cache)
        with db:
            db.execute("DELETE FROM MiscData WHERE key = 'baseline_time_elapsed'")
        db.close()
    tests = " ".join(MODULES[module])
    # mutmut takes only exit status 1 as "killed": a mutant that breaks the import (pytest's 2, a
    # collection error) would "survive". Any failure of the selection is exit status 1 here.
    runner = f"{sys.executable} -c '{PYTEST}' -x -q -p no:cacheprovider {tests}"
    cmd = [
        sys.executable, "-m", "mutmut", "run", "--paths-to-mutate", module, "--tests-dir", "tests",
        "--runner", runner, "--no-progress", "--simple-output",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - started
    shutil.copy2(REPO / module, work / module)  # a killed run may leave its mutant in the copy
    if not cache.is_file():
        raise SystemExit(f"mutmut wrote no results for {module}; run it by hand: {' '.join(cmd)}")
    counts, survivor_ids, sampled = _counts(cache, module, chosen)
    diffs = []
    for pk in survivor_ids:
        shown = subprocess.run(
            [sys.executable, "-m", "mutmut", "show", str(pk)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        diffs.append(shown.stdout.strip())
    return Result(
        module=module,
        killed=counts.get("ok_killed", 0),
        survived=counts.get("bad_survived", 0),
        timeout=counts.get("bad_timeout", 0),
        suspicious=counts.get("ok_suspicious", 0),
        untested=counts.get("untested", 0),
        survivors=tuple(diffs),
        seconds=seconds,
        total=total,
        sampled=sampled if chosen is not None else total,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: every module ({', '.join(MODULES)})")
    parser.add_argument("--budget-s", type=float, default=300.0, help="time budget per module")
    parser.add_argument(
        "--keep", type=Path, help="keep the scratch copy (and its .mutmut-cache) here; reused when it exists"
    )
    parser.add_argument("--sample", type=int, help="test only N mutants per module, the same N each run")
    parser.add_argument("--json", type=Path, help="write the figures and the survivors here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not configured: {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    if subprocess.run([sys.executable, "-m", "mutmut", "version"], capture_output=True).returncode:
        print("mutmut is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="cryid-mutation-"))
    work.mkdir(parents=True, exist_ok=True)
    env = scratch_copy(work)
    results = []
    try:
        for module in args.modules or list(MODULES):
            r = run_module(work, env, module, args.budget_s, args.sample)
            results.append(r)
            rate = "-" if r.kill_rate is None else f"{100 * r.kill_rate:.0f}%"
            print(
                f"{module}: kill rate {rate} ({r.killed} killed, {r.timeout} timed out, {r.survived} "
                f"survived, {r.suspicious} killed slowly; {r.untested} not reached in {r.seconds:.0f} s; "
                f"{r.sampled} of {r.total} mutants sampled)",
                flush=True,
            )
            for diff in r.survivors:
                print("  survived:\n    " + diff.replace("\n", "\n    "))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nmodule | mutants | sampled | tested | killed+timeout | survived | not reached | kill rate")
    for r in results:
        rate = "-" if r.kill_rate is None else f"{100 * r.kill_rate:.0f}%"
        print(
            f"{r.module} | {r.total} | {r.sampled} | {r.tested} | {r.caught} | {r.survived} | "
            f"{r.untested} | {rate}"
        )
    if args.json:
        summary = {
            r.module: {
                "mutants": r.total,
                "sampled": r.sampled,
                "tested": r.tested,
                "killed": r.killed,
                "timeout": r.timeout,
                "suspicious": r.suspicious,
                "survived": r.survived,
                "not_reached": r.untested,
                "kill_rate": r.kill_rate,
                "seconds": round(r.seconds, 1),
                "load_average": os.getloadavg()[0],
                "survivors": list(r.survivors),
            }
            for r in results
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
