"""Ctrl-C and SIGTERM on a real process: the run finishes its step, saves a checkpoint at the step
boundary and exits with one line; resuming then equals the uninterrupted run bit for bit. An
interrupt outside the training loop ends with one line and exit code 130."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = "--dtype float32 --no-compile --device cpu --log-every 1 --eval-every 1000".split()
# train_river.py reads a first stage: a tiny one is made here once per session (river_first_stage)
RIVER_FIRST_STAGE = Path(tempfile.gettempdir()) / f"test_interrupt_first_stage_{os.getpid()}"
SCRIPTS = {  # tiny settings of each script; steps long enough to interrupt in the middle
    "train_vqvae.py": "--steps 12 --resolution 32 --frames 4 --train-clips 4 --eval-clips 2 "
    "--width 8 --codebook-size 16 --batch-size 8 --warmup-steps 1 --lr 3e-3 --no-export "
    "--sample-every 1000 --ckpt-every 5",
    "train_world_model.py": "--steps 12 --resolution 32 --frames 6 --context 3 --horizon 2 "
    "--train-clips 4 --eval-clips 3 --width 4 --hidden 8 --heads 2 --batch-size 2 "
    "--warmup-steps 1 --lr 3e-3 --curriculum 0.5 --sample-every 1000 --ckpt-every 5",
    # one stage (its log lines read "teacher step 6/12", which the markers "step 6/" match)
    "train_self_forcing.py": "--stage teacher --teacher-steps 12 --resolution 16 --frames 6 "
    "--chunk 3 --window 6 --train-clips 8 --eval-clips 3 --width 32 --depth 1 --batch-size 4 "
    "--sample-every 1000 --ckpt-every 5",
    "train_river.py": "--steps 12 --resolution 32 --frames 6 --context 3 --horizon 3 --rollout 4 "
    "--train-clips 4 --eval-clips 3 --width 16 --heads 2 --depth 1 --mid-depth 1 --batch-size 4 "
    "--warmup-steps 1 --ode-steps 3 --val-draws 2 --sample-every 1000 --ckpt-every 5 "
    f"--vqvae {RIVER_FIRST_STAGE}",
}


@pytest.fixture(scope="session")
def river_first_stage():
    """The 32 px smoke first stage train_river.py's entry reads (train_vqvae.py, 2 steps)."""
    tiny = "--steps 2 --resolution 32 --frames 4 --train-clips 4 --eval-clips 2 --width 8 "
    tiny += "--codebook-size 16 --batch-size 8 --warmup-steps 1"
    cmd = [sys.executable, "train_vqvae.py", *tiny.split(), *COMMON, "--out-dir"]
    subprocess.run([*cmd, str(RIVER_FIRST_STAGE)], cwd=ROOT, env=ENV, check=True)
    yield RIVER_FIRST_STAGE
    shutil.rmtree(RIVER_FIRST_STAGE, ignore_errors=True)


@pytest.fixture(autouse=True)
def first_stage_for_river(request):
    if "train_river.py" in request.node.name:
        request.getfixturevalue("river_first_stage")


def command(script, out_dir, *extra):
    args = [*SCRIPTS[script].split(), *COMMON, "--out-dir", str(out_dir), *extra]
    return [sys.executable, script, *args]


def weights(out_dir):
    ckpts = sorted(Path(out_dir).glob("ckpt*.pt"))
    return {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in ckpts}


def same(a, b):
    """Two checkpoints hold the same step, weights, optimiser state and RNG states."""
    if a.keys() != b.keys():
        return False
    for name in a:
        x, y = a[name], b[name]
        if x["step"] != y["step"] or x["model"].keys() != y["model"].keys():
            return False
        if not all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"]):
            return False
        if "rng" in x and not torch.equal(x["rng"]["torch"], y["rng"]["torch"]):
            return False
    return True


def default_sigint():
    """A job started in the background inherits an ignored SIGINT; a terminal's job does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_after_line(cmd, marker, sig=signal.SIGINT, second=False):
    """Start cmd, send `sig` as soon as a line containing `marker` is printed -> (rc, output)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(sig)
            if second:  # at once: the step under way is not finished
                proc.send_signal(sig)
            break
    lines += proc.stdout.readlines()
    return proc.wait(timeout=300), "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("at", ["step 1/", "step 6/"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_equals_straight_run(script, at, sig, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(command(script, straight), cwd=ROOT, env=ENV, check=True, capture_output=True)
    resumed = tmp_path / "resumed"
    rc, out = interrupt_after_line(command(script, resumed), at, sig)
    assert rc != 0 and "interrupted after step" in out, out[-2000:]
    assert "Traceback" not in out
    subprocess.run(command(script, resumed), cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert same(weights(straight), weights(resumed))


@pytest.mark.parametrize("script", ["train_vqvae.py"])
def test_interrupt_outside_the_loop_is_one_line(script, tmp_path):
    """Ctrl-C while the training clips are generated: exit 130, one line, nothing written."""
    cmd = command(script, tmp_path, "--train-clips", "100000")
    rc, out = interrupt_after_line(cmd, "train clips", signal.SIGINT)
    assert rc == 130, out[-2000:]
    assert "Traceback" not in out and "interrupted;" in out.splitlines()[-1]
    assert not (tmp_path / "ckpt.pt").exists()
