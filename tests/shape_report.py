"""Print, per Python file of the repo, its line count and its longest function.

python tests/shape_report.py    # exit 1 if a main() is over 100 lines or another function
                                # over 60; lines wider than 100 columns are counted (long
                                # strings that ruff format leaves whole)
"""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAIN_LIMIT, FUNCTION_LIMIT, WIDTH = 100, 60, 100


def functions(tree):
    """-> (length in lines, name, first line) of every function and method, longest first."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((node.end_lineno - node.lineno + 1, node.name, node.lineno))
    return sorted(found, reverse=True)


def over_limit(found):
    return [f for f in found if f[0] > (MAIN_LIMIT if f[1] == "main" else FUNCTION_LIMIT)]


def main():
    bad = False
    print(f"{'file':<34} {'lines':>5} {'wide':>4} {'main':>4}  longest function")
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        found = functions(ast.parse(text))
        main_len = next((n for n, name, _ in found if name == "main"), None)
        longest = f"{found[0][1]} ({found[0][0]} lines, line {found[0][2]})" if found else "-"
        wide = sum(len(line) > WIDTH for line in text.splitlines())
        problems = [f"{name} {n} lines" for n, name, _ in over_limit(found)]
        bad = bad or bool(problems)
        name = str(path.relative_to(ROOT))
        main_text = str(main_len) if main_len else "-"
        note = f"  OVER: {', '.join(problems)}" if problems else ""
        lines = len(text.splitlines())
        print(f"{name:<34} {lines:>5} {wide:>4} {main_text:>4}  {longest}{note}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
