"""The fenced infrastructure block: byte-identical in every train_*.py, and what it promises."""

import math
import pathlib

import pytest
import torch

import train_vqvae as script  # the block is identical everywhere: one script's copy stands for all

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("train_*.py"))
START = "# Infrastructure: byte-identical in every train_*.py"
END = "# End of infrastructure."


def fenced_block(path):
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    assert len(starts) == 1 and len(ends) == 1, f"{path.name}: one fenced block expected"
    assert starts[0] < ends[0]
    return "\n".join(lines[starts[0] : ends[0] + 1])


def test_every_script_has_the_same_fenced_block():
    assert len(SCRIPTS) >= 4
    blocks = {p.name: fenced_block(p) for p in SCRIPTS}
    reference = blocks["train_vqvae.py"]
    assert len(reference.splitlines()) > 100
    differ = [name for name, block in blocks.items() if block != reference]
    assert not differ, f"fenced block differs from train_vqvae.py's in {differ}"


def test_nothing_of_the_block_is_written_twice():
    """A script keeps no second copy of what the block defines (the old boilerplate)."""
    names = ["def cpu_has_bf16", "def rng_state", "def load_checkpoint", "PEAK_FLOPS = "]
    for path in SCRIPTS:
        text = path.read_text()
        for name in names:
            assert text.count(name) == 1, f"{path.name} defines {name!r} {text.count(name)} times"


def test_lr_schedule_warm_up_then_cosine_to_a_tenth():
    peak, total, warmup = 2.0, 100, 10
    assert script.lr_at(0, total, peak, warmup) == pytest.approx(peak * 0.1 * 1.0, rel=1e-3)
    assert script.lr_at(9, total, peak, warmup) == pytest.approx(
        peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    )
    assert script.lr_at(50, total, peak, warmup) == pytest.approx(peak * 0.55)
    assert script.lr_at(total, total, peak, warmup) == pytest.approx(peak * 0.1)
    assert script.lr_at(10_000, total, peak, warmup) == pytest.approx(peak * 0.1)
    assert script.lr_at(60, total, peak, warmup, decay=False) == peak


def test_loss_meter_means_and_non_finite_stop(tmp_path):
    rt = script.Runtime(torch.device("cpu"), "float32", None, False, 0, 1, False, True)
    meter = script.LossMeter(["a", "b"], "cpu")
    meter.add([1.0, 4.0])
    meter.add(torch.tensor([3.0, 0.0]))
    weights = [torch.ones(3)]
    assert meter.means(rt, weights, "here") == {"a": 2.0, "b": 2.0}
    meter.reset()
    meter.add([1.0, 1.0])
    assert meter.means(rt, weights, "here") == {"a": 1.0, "b": 1.0}
    with pytest.raises(SystemExit, match="non-finite"):
        meter.means(rt, [torch.tensor([1.0, math.nan])], "before step 3")
    meter.add([math.inf, 0.0])
    with pytest.raises(SystemExit, match="before step 7"):
        meter.means(rt, weights, "before step 7")


def test_speed_meter_leaves_out_warm_up_and_counts_flops(monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(clock))
    speed = script.SpeedMeter(start=10, peak=100.0)  # clock 0
    for step in range(11, 11 + script.WARMUP_STEPS + 4):
        speed.tick(step, flops=50.0)  # each tick and lap read the clock once: a step takes 1 s
        speed.lap()
    text, perf = speed.report(samples_per_step=8, steps_left=60)
    assert perf["steps_per_s"] == pytest.approx(1.0)  # 4 timed steps of 1 s each
    assert perf["samples_per_s"] == pytest.approx(8.0)
    assert perf["mfu"] == pytest.approx(0.5)  # 50 FLOPs in 1 s on a peak of 100
    assert "1000 ms/step" in text and "ETA 1.0 min" in text
    summary = speed.summary(samples_per_step=8)
    assert summary["train_ms_per_step"] == pytest.approx(1000.0)
    assert summary["mfu"] == pytest.approx(0.5)
    assert speed.report(8, 0) == ("warm-up", {})  # nothing timed since the last report


def test_checkpoint_is_atomic_and_refuses_foreign_files(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    arch = {"width": 8}
    script.save_atomic({"script": script.SCRIPT, "arch": arch, "step": 3}, path)
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    assert script.load_checkpoint(path, arch)["step"] == 3
    with pytest.raises(SystemExit, match="another architecture: width=8 \\(now 16\\)"):
        script.load_checkpoint(path, {"width": 16})
    script.save_atomic({"script": "train_other.py", "arch": arch}, path)
    with pytest.raises(SystemExit, match="written by train_other.py, not train_vqvae.py"):
        script.load_checkpoint(path, arch)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        script.load_checkpoint(str(tmp_path / "bad.pt"), arch)


def test_rng_state_round_trip_restores_every_generator():
    gen = torch.Generator().manual_seed(5)
    state = script.rng_state([gen.get_state()])
    draws = (
        script.random.random(),
        script.np.random.rand(),
        torch.rand(1),
        torch.rand(1, generator=gen),
    )
    data = script.set_rng_state(state, rank=0)
    gen.set_state(data)
    again = (
        script.random.random(),
        script.np.random.rand(),
        torch.rand(1),
        torch.rand(1, generator=gen),
    )
    assert (
        draws[:2] == again[:2]
        and torch.equal(draws[2], again[2])
        and torch.equal(draws[3], again[3])
    )
    assert script.set_rng_state(state, rank=1) is None  # another world size: the rank has no state


def test_auto_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(script, "cpu_has_bf16", lambda: True)
    assert script.auto_dtype("cpu") == "bfloat16"
    monkeypatch.setattr(script, "cpu_has_bf16", lambda: False)
    assert script.auto_dtype("cpu") == "float32"
    assert script.auto_dtype("mps") == "float32"
