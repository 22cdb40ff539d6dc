"""Shared pytest set-up: the repo root on sys.path, a `slow` marker that runs only on request,
and the runner of the torchrun tests."""

import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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


def worker_pids(pid):
    """The child processes of pid (Linux /proc; none elsewhere)."""
    pids = []
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{d}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            pids.append(int(d))
    return pids


def torchrun_once(cmd, env, timeout):
    """One run -> (CompletedProcess, hung). On a hang the workers (own sessions, torchrun's
    doing) get SIGABRT, so faulthandler prints where each one waits into the captured stderr."""
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err), False
    except subprocess.TimeoutExpired:
        for pid in worker_pids(p.pid):
            os.kill(pid, signal.SIGABRT)
        p.terminate()
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        err = f"torchrun hung for {timeout} s; the workers' stacks at SIGABRT:\n{err}"
        return subprocess.CompletedProcess(cmd, 1, out, err), True


def torchrun(args, env, timeout=150):
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 *args` in the repo root.
    Gloo on CPU rarely aborts at process exit ("terminate called without an active exception")
    or hangs, seen among many tests, never alone: then once more, from scratch (--no-resume)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    r, hung = torchrun_once([*cmd, *args], env, timeout)
    if hung or (r.returncode and "terminate called without an active exception" in r.stderr):
        # in pytest's warnings summary, so a pass on the second try still shows the first
        warnings.warn(f"torchrun tried again after: {r.stderr[-4000:]}", stacklevel=2)
        r, _ = torchrun_once([*cmd, *args, "--no-resume"], env, timeout)
    return r
