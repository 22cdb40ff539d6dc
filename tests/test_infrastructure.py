"""The fenced infrastructure block: byte-identical in every train_*.py, and what it promises."""

import math
import os
import pathlib
import signal
from dataclasses import asdict

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


def test_speed_meter_leaves_out_warm_up_and_counts_flops_and_graphs(monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(clock))
    graphs = [5]  # made by an earlier run in this process: not this run's
    monkeypatch.setattr(script, "compiled_graphs", lambda: graphs[0])
    speed = script.SpeedMeter(start=10, peak=(100.0, "measured"))  # clock 0
    for step in range(11, 11 + script.WARMUP_STEPS + 4):
        if step == 11:
            graphs[0] += 3  # compiled by the first step
        speed.tick(step, flops=50.0)  # each tick and lap read the clock once: a step takes 1 s
        speed.lap()
    text, perf = speed.report(samples_per_step=8, steps_left=60)
    assert perf["steps_per_s"] == pytest.approx(1.0)  # 4 timed steps of 1 s each
    assert perf["samples_per_s"] == pytest.approx(8.0)
    assert perf["gflop_per_s"] == pytest.approx(50e-9)
    assert perf["mfu"] == pytest.approx(0.5)  # 50 FLOPs in 1 s on a peak of 100
    assert "1000 ms/step" in text and "ETA 1.0 min" in text and "MFU 50.0%" in text
    # warm-up: from the meter's start to the end of its last step (clock 2 * WARMUP_STEPS - 1)
    assert f"warm-up {2 * script.WARMUP_STEPS - 1:.1f} s, 3 graphs compiled" in text
    assert "after warm-up" not in text
    graphs[0] += 1  # a recompilation
    speed.tick(11 + script.WARMUP_STEPS + 4, flops=50.0)
    text, _ = speed.report(8, 0)
    assert "warm-up 5" not in text and "1 graphs compiled after warm-up" in text
    summary = speed.summary(samples_per_step=8)
    assert summary["train_ms_per_step"] == pytest.approx(1000.0)
    assert summary["mfu"] == pytest.approx(0.5)
    assert summary["peak_gflop_per_s"] == pytest.approx(100e-9)
    assert summary["peak_source"] == "measured"
    assert summary["graphs_compiled"] == 4 and summary["graphs_after_warmup"] == 1
    assert speed.report(8, 0) == ("warm-up", {})  # nothing timed since the last report


def test_measured_peak_is_a_matmul_rate_and_measured_once(monkeypatch):
    rt = script.Runtime(torch.device("cpu"), "float32", None, False, 0, 1, False, True)
    monkeypatch.setattr(script, "MEASURED_PEAKS", {})
    # the products take 1 s, 0.5 s, 2 s, ...: three, as they pass half a second together
    ticks = iter([0.0, 1.0, 10.0, 10.5, 20.0, 22.0, 30.0])
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(ticks))
    peak, source = script.peak_flops(rt)
    assert source == "measured" and peak == 2 * 1024**3 / 0.5  # the fastest product
    assert script.peak_flops(rt) == (peak, source)  # cached: the clock is not read again
    assert next(ticks) == 30.0


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


def test_control_stops_at_the_step_boundary_and_a_second_signal_at_once(capsys):
    rt = script.Runtime(torch.device("cpu"), "float32", None, False, 0, 1, False, True)
    before = signal.getsignal(signal.SIGINT)
    with script.Control(rt) as control:
        assert control.poll(step=11, start=10) == (False, True)  # first step of a run: a log line
        assert control.poll(step=12, start=10) == (False, False)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no exception, a request
        assert control.poll(step=13, start=10)[0] is True
        assert "stopping after this step" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal: at once
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_control_asks_for_a_log_line_when_the_last_one_is_old(monkeypatch):
    rt = script.Runtime(torch.device("cpu"), "float32", None, False, 0, 1, False, True)
    clock = iter([0.0, 10.0, 31.0, 32.0])
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(clock))
    control = script.Control(rt)  # clock 0
    assert control.poll(step=5, start=0) == (False, False)  # 10 s since the last line
    assert control.poll(step=6, start=0) == (False, True)  # 31 s: due (the clock restarts at 32)


def test_resume_with_changed_run_flags_is_refused_with_the_exact_command():
    args = script.Args(steps=40, lr=1e-3)
    ckpt = {"args": {**asdict(args), "steps": 20, "out_dir": "elsewhere", "attention": False}}
    with pytest.raises(SystemExit) as e:
        script.check_resume(ckpt, args, "ckpt.pt")
    message = str(e.value)
    assert "trained with --steps 20 --no-attention, not --steps 40 --attention" in message
    assert "--accept-changed-args" in message and "elsewhere" not in message
    script.check_resume({"args": {**asdict(args), "log_every": 7}}, args, "ckpt.pt")  # harmless
    script.check_resume(ckpt, script.Args(steps=40, accept_changed_args=True), "ckpt.pt")


def test_flag_text_and_count_checks():
    assert script.flag_text("batch_size", 8) == "--batch-size 8"
    assert script.flag_text("gan", False) == "--no-gan"
    assert script.flag_text("generate", ("a b", "c")) == "--generate 'a b' c"
    with pytest.raises(SystemExit, match="--batch-size 0 must be at least 1"):
        script.check_counts(script.Args(batch_size=0), ["steps", "batch_size"])
    script.check_counts(script.Args(), ["steps", "batch_size"])


def test_progress_yields_everything_and_reports_after_a_second(monkeypatch, capsys):
    clock = iter([0.0, 0.5, 1.5, 2.0, 7.0])
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(clock))
    assert list(script.progress(range(4), 4, "train clips")) == [0, 1, 2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["train clips: 1/4, 2 s, ETA 4 s", "train clips: 3/4, 7 s, ETA 2 s"]


def test_fp16_autocast_and_the_loss_scaler_skip_an_inf_step():
    """The fp16 path on the CPU: autocast runs the forward in fp16, the scaler unscales before
    clipping, and a step with an inf gradient is skipped (weights kept, scale halved)."""
    rt = script.Runtime(
        torch.device("cpu"),
        "float16",
        torch.autocast("cpu", torch.float16),
        False,
        0,
        1,
        False,
        True,
    )
    scaler = script.make_scaler(rt)
    assert scaler.is_enabled()
    layer = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.ones(1, 4)
    with rt.amp:
        out = layer(x)
    assert out.dtype == torch.float16
    before = [p.detach().clone() for p in layer.parameters()]
    scale = scaler.get_scale()
    script.optimizer_step(opt, scaler, out.float().sum() * math.inf, layer.parameters(), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert scaler.get_scale() == scale / 2
    with rt.amp:
        loss = layer(x).float().sum()
    script.optimizer_step(opt, scaler, loss, layer.parameters(), 0.0)
    # d(output)/d(weight) = the input, 1 per weight: one SGD step of lr 0.1, unscaled
    assert torch.allclose(layer.weight, before[0] - 0.1, atol=1e-3)
