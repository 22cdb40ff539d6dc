"""Bounded compilation: every script run with --compile on the CPU compiles its graphs during the
warm-up steps and none after (evaluation included), as the speed meter counts them
(perf.graphs_after_warmup in metrics.json). Slow: inductor compiles for minutes on a small CPU.

    python -m pytest -m slow tests/test_compile.py -s    # prints graphs and compile time per script
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_LOGS": "recompiles"}
COMMON = "--device cpu --dtype float32 --compile --log-every 1 --no-resume".split()

# tiny settings; each runs past warm-up (3 steps) into evaluation and, where the shapes of a step
# can change (the world model's rollout curriculum, Self Forcing's stages), through the change
VQVAE = (
    "--steps 7 --eval-every 5 --sample-every 100 --ckpt-every 100 --resolution 32 --frames 4 "
    "--train-clips 4 --eval-clips 2 --width 8 --codebook-size 16 --batch-size 8 --warmup-steps 1"
)
RUNS = {
    "train_vqvae.py": VQVAE,
    "train_vqvae.py 3d": VQVAE + " --temporal-downsample 2 --no-attention",
    "train_world_model.py": "--steps 12 --eval-every 4 --sample-every 100 --ckpt-every 100 "
    "--resolution 32 --frames 6 --context 3 --horizon 3 --curriculum 1.0 --train-clips 4 "
    "--eval-clips 3 --width 4 --hidden 8 --batch-size 2 --warmup-steps 1",
    "train_river.py": "--steps 7 --eval-every 5 --sample-every 100 --ckpt-every 100 "
    "--resolution 32 --frames 6 --context 3 --horizon 3 --rollout 4 --train-clips 4 "
    "--eval-clips 3 --width 16 --heads 2 --depth 1 --mid-depth 1 --batch-size 4 "
    "--warmup-steps 1 --ode-steps 3 --val-draws 2 --bench-frames 2",
    "train_self_forcing.py": "--teacher-steps 6 --ode-steps 5 --steps 5 --eval-every 100 "
    "--sample-every 100 --ckpt-every 100 --resolution 16 --frames 6 --chunk 3 --window 6 "
    "--train-clips 8 --eval-clips 3 --width 32 --depth 1 --batch-size 4",
    "train_videogpt.py": "--data bouncing_balls --resolution 16 --frames 4 --context 2 --steps 7 "
    "--eval-every 5 --sample-every 100 --ckpt-every 100 --train-clips 6 --eval-clips 3 "
    "--samples 3 --bench-samples 2 --width 12 --heads 2 --layers 1 --batch-size 3 "
    "--warmup-steps 1",
}
FIRST_STAGES = {  # second stages: the exported first stage they read (--vqvae), made eagerly
    "train_river.py": "--resolution 32 --frames 4",
    "train_videogpt.py": "--data bouncing_balls --resolution 16 --frames 4 "
    "--temporal-downsample 2 --latent-channels 3 --codebook-size 8 --no-attention",
}
FIRST_STAGE = (
    "--steps 2 --train-clips 4 --eval-clips 2 --width 8 --codebook-size 16 --batch-size 8 "
    "--dtype float32 --no-compile --device cpu --warmup-steps 1"
)


def run(cmd, tmp_path):
    r = subprocess.run(
        [sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def check(perf, what, log):
    """perf of one run or stage: no graph after warm-up -> graphs compiled."""
    print(
        f"{what}: {perf['graphs_compiled']} graphs, warm-up {perf['warmup_s']:.1f} s, "
        f"{perf['graphs_after_warmup']} after warm-up"
    )
    recompiles = [line for line in log.splitlines() if "Recompiling" in line]
    assert perf["graphs_after_warmup"] == 0, f"{what}: compiled after warm-up\n" + "\n".join(
        recompiles
    )
    return perf["graphs_compiled"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_no_graph_compiled_after_warmup(name, tmp_path):
    script = name.split()[0]
    extra = []
    if script in FIRST_STAGES:
        first = tmp_path / "vqvae"
        flags = (FIRST_STAGE + " " + FIRST_STAGES[script]).split()
        run(["train_vqvae.py", *flags, "--out-dir", str(first)], tmp_path)
        extra = ["--vqvae", str(first)]
    out = tmp_path / "run"
    cmd = [script, *RUNS[name].split(), *COMMON, *extra, "--out-dir", str(out)]
    r = run(cmd, tmp_path)
    perf = json.loads((out / "metrics.json").read_text())["perf"]
    stages = perf["stages"] if script == "train_self_forcing.py" else {"": perf}
    # a later stage of the same architecture may reuse an earlier stage's graphs
    graphs = [check(p, f"{name} {stage}", r.stderr) for stage, p in stages.items()]
    assert sum(graphs) > 0, f"{name}: nothing was compiled"


@pytest.mark.slow
def test_probe_compiles_once(tmp_path):
    out = tmp_path / "probe.pt"
    cmd = "train_probe.py --steps 6 --n-per-kind 2 --batch-size 8 --log-every 1 --device cpu"
    r = run([*cmd.split(), "--compile", "--threads", "1", "--out", str(out)], tmp_path)
    perf = json.loads((tmp_path / "metrics.json").read_text())["perf"]
    assert check(perf, "train_probe.py", r.stderr) > 0, "nothing was compiled"
