"""Single-line breaks of viz.py's choices; each must fail a test (tests/mutants/run.py)."""

TESTS = ["tests/test_viz.py"]

MUTANTS = [
    {
        "name": "single_values_plotted",
        "invariant": "a scalar logged at one step gets no panel when curves exist",
        "old": "curves = {k: c for k, c in curves.items() if len(c[0]) > 1} or curves",
        "new": "curves = curves",
    },
    {
        "name": "no_fallback_to_single_values",
        "invariant": "with nothing but single values, they are plotted",
        "old": "curves = {k: c for k, c in curves.items() if len(c[0]) > 1} or curves",
        "new": "curves = {k: c for k, c in curves.items() if len(c[0]) > 1}",
    },
]
