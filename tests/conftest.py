"""Shared pytest set-up: the repo root on sys.path and a `slow` marker that runs only on request."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (its tiny runs are faster so, and timings steadier)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: longer checks, skipped unless a -m expression is given (pytest -m slow)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: run with pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def assert_flop_rate(perf):
    """FLOPs were counted on the CPU too, against a matmul peak measured at start-up."""
    assert perf["peak_source"] == "measured" and perf["peak_gflop_per_s"] > 0
    assert perf["train_gflop_per_s"] > 0
    assert perf["mfu"] == pytest.approx(perf["train_gflop_per_s"] / perf["peak_gflop_per_s"])
