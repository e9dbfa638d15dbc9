"""Mutation run: does the default test suite catch plausible one-line bugs?

Each mutation in ``bench/mutants/*.yaml`` names a file of the package, an exact snippet that occurs there once,
its replacement (the bug), and the test files or node ids that should catch it::

    - name: lora-scale-inverted
      file: usclip/adapters/lora.py
      old: "self.scaling = alpha / r"
      new: "self.scaling = r / alpha"
      tests: [tests/test_lora_switches.py]
      bug: LoRA's alpha / r scale inverted in the forward pass

The runner copies the working tree (``git ls-files``: tracked and untracked-but-not-ignored files) into a
temporary folder, applies one mutation at a time, runs ``pytest -x -m "not slow and not realdata"`` on the named
tests with the real data folder hidden (``USCLIP_DATA_DIR`` points at a missing folder), and restores the file.
A mutation is *killed* when pytest fails (or times out), *survived* when the tests pass. Only the default suite
counts: a bug caught only by a slow or a real-data test survives here.

Usage::

    python bench/mutants.py                 # every mutation (make mutants); exit 1 if any survives
    python bench/mutants.py --check         # only check that every mutation applies (also a default test)
    python bench/mutants.py --only lora     # mutations whose name or area contains "lora"
    python bench/mutants.py --jobs 2 --json mutants.json

Written by hand: mutmut and cosmic-ray generate operator-level mutants at random; this list is curated (the bugs
issue #17 names, one per design decision) and each names the tests that should kill it, so the run takes minutes,
not hours, and a survivor points at the missing test.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

logger = logging.getLogger("mutants")

REPO = Path(__file__).resolve().parents[1]
MUTANT_DIR = REPO / "bench" / "mutants"
_KEYS = {"name", "file", "old", "new", "tests", "bug"}


@dataclass(frozen=True)
class Mutation:
    """One named one-line (or few-line) change to the package and the tests that must catch it."""

    name: str
    area: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str = ""


@dataclass
class Outcome:
    """What the tests did with one mutation."""

    name: str
    status: str  # killed | survived | timeout | error
    detail: str
    seconds: float


def load_mutations(directory: Path = MUTANT_DIR) -> list[Mutation]:
    """Read every ``*.yaml`` list of mutations in ``directory`` (the area is the file's stem).

    Raises:
        ValueError: a malformed entry or a repeated name, naming the file and the entry.
    """
    mutations: list[Mutation] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.yaml")):
        entries = yaml.safe_load(path.read_text()) or []
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of mutations, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"name", "file", "old", "new", "tests"} <= set(entry):
                raise ValueError(f"{path} entry {i}: needs name, file, old, new, tests; got {entry!r}")
            unknown = set(entry) - _KEYS
            if unknown:
                raise ValueError(f"{path} entry {i} ({entry['name']}): unknown keys {sorted(unknown)}")
            name = str(entry["name"])
            if name in seen:
                raise ValueError(f"{path}: mutation name {name!r} repeated (also in {seen[name]})")
            seen[name] = path
            tests = entry["tests"]
            if isinstance(tests, str):
                tests = [tests]
            mutations.append(
                Mutation(
                    name=name,
                    area=path.stem,
                    file=str(entry["file"]),
                    old=str(entry["old"]),
                    new=str(entry["new"]),
                    tests=tuple(str(t) for t in tests),
                    bug=str(entry.get("bug", "")),
                )
            )
    return mutations


def check_mutation(mutation: Mutation, root: Path = REPO) -> list[str]:
    """Problems that would make the mutation meaningless: empty list when it applies cleanly.

    The snippet must occur exactly once, differ from its replacement, leave the file valid Python (a syntax error
    would be "killed" by any test), and every named test file must exist.
    """
    problems = []
    path = root / mutation.file
    if not path.is_file():
        return [f"{mutation.name}: file {mutation.file} not found"]
    source = path.read_text()
    count = source.count(mutation.old)
    if count != 1:
        problems.append(f"{mutation.name}: snippet occurs {count} times in {mutation.file}, expected exactly once")
    if mutation.old == mutation.new:
        problems.append(f"{mutation.name}: old and new are the same")
    if count == 1 and path.suffix == ".py":
        try:
            ast.parse(source.replace(mutation.old, mutation.new))
        except SyntaxError as error:
            problems.append(f"{mutation.name}: the mutated {mutation.file} is not valid Python ({error})")
    if not mutation.tests:
        problems.append(f"{mutation.name}: no tests named")
    for test in mutation.tests:
        if not (root / test.split("::")[0]).is_file():
            problems.append(f"{mutation.name}: test file {test.split('::')[0]} not found")
    return problems


def copy_tree(destination: Path, root: Path = REPO) -> None:
    """Copy the working tree's tracked and non-ignored files (symlinks kept) into ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        src = root / rel
        dst = destination / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet in the index
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)


def _pytest_command(tests: tuple[str, ...]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-rfE",
        "--no-header",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=--strict-markers",
        "-m",
        "not slow and not realdata",
        *tests,
    ]


def _environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(copy),
        HF_HUB_OFFLINE="1",
        USCLIP_DATA_DIR=str(copy / "_no_real_data_in_mutation_runs"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def _first_failure(output: str) -> str:
    match = re.search(r"^(FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    if match:
        return match.group(2)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """Run pytest on ``tests`` inside ``copy``; ``None`` as the return code means it timed out."""
    try:
        done = subprocess.run(
            _pytest_command(tests),
            cwd=copy,
            env=_environment(copy),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, ""
    return done.returncode, done.stdout + done.stderr


def run_mutation(mutation: Mutation, copy: Path, timeout: float) -> Outcome:
    """Apply ``mutation`` inside ``copy``, run its tests, restore the file."""
    path = copy / mutation.file
    original = path.read_text()
    start = time.perf_counter()
    path.write_text(original.replace(mutation.old, mutation.new, 1))
    try:
        code, output = run_tests(copy, mutation.tests, timeout)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    if code is None:
        return Outcome(mutation.name, "timeout", f"no verdict within {timeout:.0f} s (counted as killed)", seconds)
    if code == 0:
        return Outcome(mutation.name, "survived", "all named tests passed", seconds)
    if code == 5:
        return Outcome(mutation.name, "error", "no tests collected (slow/realdata only?)", seconds)
    if code in (3, 4):  # pytest's internal and usage errors say nothing about the mutation
        return Outcome(mutation.name, "error", f"pytest rc {code}: {_first_failure(output)}", seconds)
    return Outcome(mutation.name, "killed", _first_failure(output), seconds)


def _check_copy_is_imported(copy: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import usclip, sys; sys.stdout.write(usclip.__file__)"],
        cwd=copy,
        env=_environment(copy),
        capture_output=True,
        text=True,
        check=True,
    )
    if not Path(done.stdout).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the tests would import usclip from {done.stdout}, not from the mutated copy {copy}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run mutations whose name or area contains this text")
    parser.add_argument("--check", action="store_true", help="only check that every mutation applies")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at once (one tree copy each)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation before it counts killed")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of all named tests")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C, so the temporary tree copies are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    mutations = [m for m in load_mutations() if args.only in m.name or args.only in m.area]
    if args.list:
        for m in mutations:
            logger.info("%-40s %-10s %s", m.name, m.area, m.bug)
        return 0
    problems = [p for m in mutations for p in check_mutation(m)]
    if problems:
        logger.error("mutations that do not apply:\n  %s", "\n  ".join(problems))
        return 2
    logger.info("%d mutations apply cleanly", len(mutations))
    if args.check or not mutations:
        return 0

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = "AVX-512" if " avx512f" in flags else ("AVX2" if " avx2" in flags else "no AVX2")
    logger.info("machine: %d cores, %s; %d job(s)", os.cpu_count() or 0, cpu, args.jobs)
    with tempfile.TemporaryDirectory(prefix="usclip-mutants-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for j in range(max(1, args.jobs)):
            copy = Path(tmp) / f"tree{j}"
            copy_tree(copy)
            copies.put(copy)
        first = copies.get()
        _check_copy_is_imported(first)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
            start = time.perf_counter()
            code, output = run_tests(first, tests, timeout=args.timeout * 4)
            if code != 0:
                logger.error("the unmutated tests fail (rc %s), nothing to measure:\n%s", code, output[-4000:])
                return 2
            logger.info("baseline: %d test targets pass unmutated in %.0f s", len(tests), time.perf_counter() - start)
        copies.put(first)

        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def work(mutation: Mutation) -> None:
            copy = copies.get()
            try:
                outcome = run_mutation(mutation, copy, args.timeout)
            finally:
                copies.put(copy)
            with lock:
                outcomes.append(outcome)
                logger.info("%-9s %-40s %5.0f s  %s", outcome.status, outcome.name, outcome.seconds, outcome.detail)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(work, mutations))

    killed = sum(o.status in ("killed", "timeout") for o in outcomes)
    survivors = [o.name for o in outcomes if o.status == "survived"]
    errors = [o.name for o in outcomes if o.status == "error"]
    logger.info("killed %d / %d mutations", killed, len(outcomes))
    if survivors:
        logger.info("survived: %s", ", ".join(survivors))
    if errors:
        logger.info("errors: %s", ", ".join(errors))
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    return 1 if survivors or errors else 0


if __name__ == "__main__":
    sys.exit(main())
