"""Mutation check: break one line of a method on purpose and see that a test fails.

Each file tests/mutants/<script stem>.py holds MUTANTS, a list of single-line breaks of that
script (the exact source text, its replacement, and the invariant it breaks). For each one this
copies the repo to a temporary folder, applies the break, runs the script's tests there and
counts the mutant as caught when a test fails.

    python tests/mutants/run.py                   # every script
    python tests/mutants/run.py train_vqvae       # one script
    python tests/mutants/run.py train_river -k rk4   # mutants whose name contains "rk4"

It is a development tool, not part of the test suite: a full run takes tens of minutes on two
cores (a caught mutant stops at its first failing test, an escaped one runs them all).
"""

import argparse
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent


def load_mutants(stem):
    spec = importlib.util.spec_from_file_location(f"mutants_{stem}", HERE / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS, getattr(module, "TESTS", [f"tests/test_{stem}.py"])


def copy_repo(dest):
    """The files the tests need: top-level .py files, tests/ and assets/."""
    for path in ROOT.glob("*.py"):
        shutil.copy2(path, dest / path.name)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    if (ROOT / "assets").is_dir():
        shutil.copytree(ROOT / "assets", dest / "assets")


def apply(dest, mutant):
    """Replace the mutant's `old` text (it must occur exactly once) -> an error text or None."""
    path = dest / mutant.get("file", "")
    source = path.read_text()
    count = source.count(mutant["old"])
    if count != 1:
        return f"`old` occurs {count} times in {path.name}"
    mutated = source.replace(mutant["old"], mutant["new"])
    try:
        compile(mutated, str(path), "exec")
    except SyntaxError as e:
        return f"the mutant does not compile: {e}"
    path.write_text(mutated)
    return None


def first_failure(output):
    for line in output.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line[:160]
    return output.strip().splitlines()[-1][:160] if output.strip() else ""


def run_one(stem, mutant, tests, timeout):
    """-> (status, detail): caught, escaped or invalid."""
    mutant = {"file": f"{stem}.py", **mutant}
    with tempfile.TemporaryDirectory() as tmp:
        dest = pathlib.Path(tmp)
        copy_repo(dest)
        problem = apply(dest, mutant)
        if problem:
            return "invalid", problem
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        try:
            proc = subprocess.run(
                cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "caught", f"timed out after {timeout}s"
        if proc.returncode == 0:
            return "escaped", "every test passed"
        return "caught", first_failure(proc.stdout + proc.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", nargs="*", help="script stems (default: every mutants file)")
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args()
    stems = args.scripts or sorted(p.stem for p in HERE.glob("train_*.py"))
    totals = {}
    for stem in stems:
        mutants, tests = load_mutants(stem)
        caught = 0
        chosen = [m for m in mutants if args.k in m["name"]]
        for mutant in chosen:
            t0 = time.time()
            status, detail = run_one(stem, mutant, tests, args.timeout)
            caught += status == "caught"
            took = time.time() - t0
            print(f"{stem} {mutant['name']:<40} {status:<8} {took:5.0f}s  {detail}", flush=True)
        totals[stem] = (caught, len(chosen))
    for stem, (caught, total) in totals.items():
        print(f"{stem}: {caught}/{total} caught")
    return 0 if all(c == t for c, t in totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
