"""train_self_forcing.py: the algorithm's invariants (reference section 6), CLI, outputs, determinism, resume, DDP, bad input."""

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import tyro

import train_self_forcing as sf

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: more threads only contend on a busy CPU

TINY = [
    "--teacher-steps",
    "3",
    "--ode-steps",
    "3",
    "--steps",
    "2",
    "--log-every",
    "1",
    "--eval-every",
    "100",
    "--sample-every",
    "2",
    "--ckpt-every",
    "1",
    "--resolution",
    "16",
    "--frames",
    "6",
    "--chunk",
    "3",
    "--window",
    "6",
    "--train-clips",
    "8",
    "--eval-clips",
    "3",
    "--width",
    "32",
    "--depth",
    "1",
    "--batch-size",
    "4",
    "--dtype",
    "float32",
    "--no-compile",
    "--device",
    "cpu",
]


def run(out_dir, *extra):
    sf.main(tyro.cli(sf.Args, args=[*TINY, "--out-dir", str(out_dir), *extra]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("tiny")
    run(out)
    return out


def random_model(window=0, chunk=2, seed=0, depth=2):
    """A small DiT with every weight random (the zero-initialised layers would make every output 0)."""
    torch.manual_seed(seed)
    model = sf.DiT(resolution=16, patch=8, width=32, depth=depth, chunk=chunk, window=window)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    return model.eval()


def inputs(T=8, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor(
        [
            sf.encode_prompt("A red circle moving from left to right"),
            sf.encode_prompt("A white ball bouncing"),
        ]
    )
    return torch.randn(B, T, 3, 16, 16, generator=g), words[:B]


def record_calls(model):
    """Wrap model.forward: for each call, (frames, sigma, grad enabled, cached K of block 0 or None)."""
    calls, forward = [], model.forward

    def spy(x, sigma, words, pos=0, mask=None, kv=None):
        calls.append(
            (
                x.shape[1],
                float(sigma.flatten()[0]),
                torch.is_grad_enabled(),
                kv[0][0] if kv else None,
            )
        )
        return forward(x, sigma, words, pos, mask, kv)

    model.forward = spy
    return calls


# ----------------------------------------------------------------------------- the algorithm (reference section 6)
def test_warped_schedule():
    assert (1000 * sf.few_step_sigmas(4, 5.0)).tolist() == pytest.approx(
        [1000, 937.5, 833.333, 625], abs=1e-3
    )
    assert (1000 * sf.few_step_sigmas(4, 1.0)).tolist() == pytest.approx(
        [1000, 750, 500, 250], abs=1e-3
    )  # no shift: uniform


def test_cached_forward_equals_block_causal_forward():
    model, (x, words) = random_model(), inputs()
    clean, c = x.clone(), model.chunk
    with torch.no_grad():
        for b in range(4):
            kv = []
            for a in range(b):  # the cache: clean earlier chunks run at t = 0, one after the other
                new = sf.predict_x0(model, clean[:, a * c : (a + 1) * c], 0.0, words, a * c, kv=kv)[
                    1
                ]
                kv = (
                    [
                        tuple(torch.cat([o, n], 2) for o, n in zip(old, kn))
                        for old, kn in zip(kv, new)
                    ]
                    if kv
                    else new
                )
            for sigma in sf.few_step_sigmas().tolist():
                cached = sf.predict_x0(
                    model, x[:, b * c : (b + 1) * c], sigma, words, b * c, kv=kv
                )[0]
                sig = torch.cat([torch.zeros(2, b * c), torch.full((2, c), sigma)], 1)
                full = sf.predict_x0(
                    model,
                    torch.cat([clean[:, : b * c], x[:, b * c : (b + 1) * c]], 1),
                    sig,
                    words,
                    mask=sf.frame_mask((b + 1) * c, c),
                )[0][:, -c:]
                assert (cached - full).abs().max() < 1e-5, (b, sigma)


def test_model_sees_absolute_frame_index():
    """RoPE alone is relative (the same frames at another start give the same x0); the frame embedding makes it absolute."""
    model, (x, words) = random_model(), inputs(T=4)
    with torch.no_grad():
        moved = (sf.predict_x0(model, x, 0.5, words, pos)[0] for pos in (0, 5))
        assert (next(moved) - next(moved)).abs().max() > 1e-3
        torch.nn.init.zeros_(model.frame.weight), torch.nn.init.zeros_(model.frame.bias)
        moved = (sf.predict_x0(model, x, 0.5, words, pos)[0] for pos in (0, 5))
        assert (next(moved) - next(moved)).abs().max() < 1e-5


def test_frame_mask_after_a_cache_is_the_tail_of_the_full_mask():
    """The mask of the fused context pass: queries after `cached` frames of keys are rows of the whole video's mask."""
    assert torch.equal(sf.frame_mask(6, 3, 0, cached=6), sf.frame_mask(12, 3)[6:])
    assert torch.equal(
        sf.frame_mask(6, 3, 6, cached=3), sf.frame_mask(12, 3, 6)[6:, 3:]
    )  # a rolled cache: 3 of 6 frames kept
    assert not sf.frame_mask(6, 3, 6, cached=3)[
        :3, -3:
    ].any()  # the context chunk never sees the next chunk


@pytest.mark.parametrize(
    "window", [0, 4, 5]
)  # < 8 frames: the cache rolls, the mask is a local window (5: not whole chunks)
def test_cached_generation_equals_recomputed_prefix(window):
    model, (noise, words) = random_model(window), inputs()
    sigmas = sf.few_step_sigmas()
    with torch.no_grad():
        a = sf.rollout(model, noise, words, sigmas, torch.Generator().manual_seed(3))
        b = sf.rollout(model, noise, words, sigmas, torch.Generator().manual_seed(3), cache=False)
    assert (a - b).abs().max() < 1e-5


def test_rolling_cache_keeps_window_and_matches_full_cache_when_wide():
    (noise, words), sigmas = inputs(T=8), sf.few_step_sigmas()
    outs = {}
    for window in (0, 8, 4):
        model = random_model(window)
        calls = record_calls(model)
        with torch.no_grad():
            outs[window] = sf.rollout(model, noise, words, sigmas, torch.Generator().manual_seed(3))
        cached = max(k.shape[2] for *_, k in calls if k is not None) // model.tokens
        assert cached == {0: 6, 8: 6, 4: 2}[window]  # never more than window - chunk frames
    assert torch.equal(outs[0], outs[8])  # W >= T: rolling changes nothing
    assert (outs[0] - outs[4]).abs().max() > 1e-3  # W < T: it does


def test_training_rollout_at_last_exit_step_equals_inference():
    model, (noise, words) = random_model(), inputs()
    sigmas = sf.few_step_sigmas()
    with torch.no_grad():
        infer = sf.rollout(model, noise, words, sigmas, torch.Generator().manual_seed(5))
    train = sf.rollout(
        model, noise, words, sigmas, torch.Generator().manual_seed(5), exit_step=len(sigmas) - 1
    )
    assert train.requires_grad  # same noise, sigmas and steps; attention with and without gradient differ only by fp32 rounding
    torch.testing.assert_close(train.detach(), infer, rtol=0, atol=1e-5)


@pytest.mark.parametrize("exit_step", [0, 2])
def test_one_forward_with_gradient_per_chunk_and_none_through_the_cache(exit_step):
    model, (noise, words) = random_model(), inputs()
    calls, x0s = record_calls(model), []
    video = sf.rollout(
        model,
        noise,
        words,
        sf.few_step_sigmas(),
        torch.Generator().manual_seed(5),
        exit_step=exit_step,
        on_step=lambda b, j, x0: x0s.append(x0),
    )
    chunks = 4
    assert len(x0s) == chunks * (exit_step + 1)  # steps after the exit step never run
    assert (
        len(calls) == chunks * (exit_step + 1) + chunks - 1
    )  # plus one t = 0 cache pass per chunk but the last
    assert (
        sum(grad for _, _, grad, _ in calls) == chunks
    )  # exactly one forward with gradient per chunk ...
    assert [sigma for _, sigma, grad, _ in calls if grad] == [
        float(sf.few_step_sigmas()[exit_step])
    ] * chunks  # ... at step s
    assert all(
        not k.requires_grad for *_, k in calls if k is not None
    )  # cached keys/values carry no gradient
    chunk0, chunk1 = (
        x0s[exit_step],
        x0s[2 * exit_step + 1],
    )  # each chunk's output: its x0 at the exit step
    assert (
        torch.autograd.grad(chunk1.sum(), chunk0, retain_graph=True, allow_unused=True)[0] is None
    )
    video.square().mean().backward()
    assert (
        all(p.grad is not None for p in model.parameters())
        and model.out.weight.grad.abs().sum() > 0
    )


def test_exit_step_is_uniform_and_shared_by_every_chunk():
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sf.sample_exit_step(gen, 4, "cpu") for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1, 2, 3}
    assert (torch.bincount(draws, minlength=4) / 4000 - 0.25).abs().max() < 0.03
    model, (noise, words) = random_model(), inputs()
    steps = []
    sf.rollout(
        model,
        noise,
        words,
        sf.few_step_sigmas(),
        gen,
        exit_step=1,
        on_step=lambda b, j, x0: steps.append((b, j)),
    )
    assert steps == [
        (b, j) for b in range(4) for j in range(2)
    ]  # every chunk stops at the same step


def test_dmd_surrogate_gradient_and_frozen_scores():
    teacher, critic, (x, words) = random_model(seed=1), random_model(seed=2), inputs()
    for m in (teacher, critic):
        m.requires_grad_(True)
    x = x.clone().requires_grad_(True)
    sigma, noise = torch.tensor([0.5, 0.9]), torch.randn_like(x)
    loss, g = sf.dmd_loss(x, teacher, critic, words, sigma, noise, 3.0)
    loss.backward()
    assert torch.allclose(x.grad, (g / g.numel()).float(), atol=1e-9) and g.abs().sum() > 0
    assert all(
        p.grad is None for m in (teacher, critic) for p in m.parameters()
    )  # the scores get no gradient
    gen = random_model(seed=3).requires_grad_(
        True
    )  # the critic step: the generator's rollout gets no gradient
    with torch.no_grad():
        fake = sf.rollout(
            gen, torch.randn_like(x), words, sf.few_step_sigmas(), torch.Generator().manual_seed(0)
        )
    sf.flow_matching_loss(critic, fake, words, sigma, noise).backward()
    assert all(p.grad is None for p in gen.parameters()) and critic.out.weight.grad.abs().sum() > 0


def tiny_stage(name="self_forcing"):
    """A DMD stage of random tiny models, as build_stage makes one: student, frozen teacher, critic from the teacher."""
    model, teacher = random_model(), random_model(seed=1).requires_grad_(False)
    critic = copy.deepcopy(teacher).requires_grad_(True)
    st = sf.Stage(
        name=name,
        model=model,
        net=model,
        ema=copy.deepcopy(model),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        opt=torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.999)),
        gen=torch.Generator().manual_seed(0),
        ngen=torch.Generator().manual_seed(1),
        sigmas=sf.few_step_sigmas(),
        total=1,
        batch=2,
        base_lr=1e-3,
        teacher=teacher,
        critic=critic,
        opt_critic=torch.optim.AdamW(critic.parameters(), lr=1e-3, betas=(0.0, 0.999)),
    )
    rt = sf.Runtime(torch.device("cpu"), "float32", nullcontext(), False, 0, 1, False, True)
    return st, rt


def snapshot(nets):
    return {k: copy.deepcopy(m.state_dict()) for k, m in nets.items()}


def test_critic_and_generator_steps_update_only_their_own_network():
    st, rt = tiny_stage()
    (x, words), args = inputs(), sf.Args()
    nets = {"generator": st.model, "teacher": st.teacher, "critic": st.critic}
    before = snapshot(nets)
    sf.critic_step(st, x, words, args, rt)
    after = snapshot(nets)
    assert [k for k in nets if not same_state(before[k], after[k])] == ["critic"]
    loss, g, s = sf.generator_step(st, x, words, args, rt)
    assert [k for k in nets if not same_state(after[k], snapshot(nets)[k])] == ["generator"]
    assert 0 <= s < len(st.sigmas) and g.shape == x.shape and torch.isfinite(loss)


def test_dmd_train_step_is_critic_updates_critic_steps_then_one_generator_step(monkeypatch):
    calls = []
    monkeypatch.setattr(sf, "critic_step", lambda *a: calls.append("critic") or torch.tensor(0.5))
    monkeypatch.setattr(
        sf,
        "generator_step",
        lambda *a: calls.append("generator") or (torch.tensor(0.25), torch.ones(1), 2),
    )
    st, rt = tiny_stage()
    videos, words = (torch.rand(4, 8, 3, 16, 16) * 255).to(torch.uint8), inputs()[1].repeat(2, 1)
    terms = sf.train_step(st, (videos, words), sf.Args(critic_updates=3), rt)
    assert calls == ["critic"] * 3 + ["generator"] and terms == [0.25, 0.5, 1.0, 2]


def test_tf_df_rollouts_use_real_context():
    model, (video, words) = random_model(), inputs()
    sigmas = sf.few_step_sigmas()
    calls = record_calls(model)
    tf = sf.rollout(
        model,
        torch.randn_like(video),
        words,
        sigmas,
        torch.Generator().manual_seed(0),
        real=(video, True),
    )
    assert len(calls) == 4 + 3 and all(
        grad for _, _, grad, _ in calls
    )  # one step per chunk; context with gradient
    assert [sigma for _, sigma, *_ in calls[1::2]] == [
        0.0
    ] * 3  # teacher forcing caches the clean real chunk
    del calls[:]
    sf.rollout(
        model,
        torch.randn_like(video),
        words,
        sigmas,
        torch.Generator().manual_seed(0),
        real=(video, False),
    )
    assert all(
        sigma > 0 for _, sigma, *_ in calls[1::2]
    )  # diffusion forcing caches the noised real chunk
    assert tf.shape == video.shape


def test_prompts_encode_and_unknown_words_list_the_vocabulary():
    ids = sf.encode_prompt("An orange triangle moving from bottom right to top left")
    assert len(ids) == sf.MAX_WORDS and 0 not in ids
    assert sf.encode_prompt("A red circle moving from left to right") != sf.encode_prompt(
        "A red circle moving from right to left"
    )
    with pytest.raises(SystemExit, match="unknown word.*pink; the vocabulary is: .*circle"):
        sf.encode_prompt("A pink circle moving from left to right")


# ----------------------------------------------------------------------------- CLI, outputs, determinism, resume
def test_help_and_explain(capsys):
    sf.main(tyro.cli(sf.Args, args=["--explain"]))
    out = capsys.readouterr().out
    names = (
        "rollout",
        "dmd_loss",
        "few_step_sigmas",
        "DiT",
        "evaluate",
        "teacher_step",
        "ode_step",
        "student_sample",
        "critic_step",
        "generator_step",
        "grad_step",
    )
    assert all(f"{name}: " in out for name in names)
    r = subprocess.run(
        [sys.executable, "train_self_forcing.py", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for text in (
        "--stage",
        "--compile, --no-compile",
        "--resume, --no-resume",
        "--eval-only",
        "--generate",
        "critic updates",
    ):
        assert text in r.stdout


def test_tiny_run_writes_outputs(tiny, capsys):
    for stage in sf.STAGES:
        ck = load(tiny / f"ckpt_{stage}.pt")
        assert (
            ck["script"] == "train_self_forcing.py"
            and ck["stage"] == stage
            and "_orig_mod" not in "".join(ck["model"])
        )
        assert ck["step"] == (2 if stage in ("self_forcing", "tf", "df") else 3)
        assert ("critic" in ck) == (stage in ("self_forcing", "tf", "df"))
    assert list(tiny.glob("events.out.tfevents.*")) and (tiny / "args.json").exists()
    m = json.loads((tiny / "metrics.json").read_text())
    assert m["script"] == "train_self_forcing.py" and m["step"] == 2
    assert set(m["baselines"]) == {"teacher", "ode", "tf", "df", "real"}
    assert (
        m["baselines"]["real"]["rotation"] > 0.05
    )  # the real "yellow square rotating clockwise" turns the prompted way
    for row in [m["eval"], *(m["baselines"][k] for k in ("ode", "tf", "df"))]:
        assert {
            "drift",
            "drift_2x",
            "rotation",
            "rotation_2x",
            "gen_frames_per_s_4x_nocache",
            "kv_speedup_4x",
            "first_chunk_latency_s",
        } <= row.keys()
        assert (
            len(row["drift_per_frame"]) == 6
            and len(row["drift_per_frame_2x"]) == 12
            and row["gen_frames_per_s"] > 0
        )
    assert (
        "gen_frames_per_s" in m["baselines"]["teacher"]
        and "kv_speedup_1x" not in m["baselines"]["teacher"]
    )
    assert set(m["perf"]["stages"]) == set(sf.STAGES) and m["perf"]["kv_speedup_4x"] > 0
    for f in (
        "samples/denoising_self_forcing.png",
        "samples/self_forcing_latest.png",
        "plots/attention_masks.png",
        "plots/drift.png",
        "plots/training_curves.png",
        "samples/teacher_000002.gif",
    ):
        assert (tiny / f).exists(), f


def test_same_seed_same_run(tiny, tmp_path):
    run(tmp_path)
    for stage in sf.STAGES:
        a, b = load(tiny / f"ckpt_{stage}.pt"), load(tmp_path / f"ckpt_{stage}.pt")
        assert same_state(a["model"], b["model"]) and same_state(a["ema"], b["ema"]), stage
    ma, mb = (json.loads((d / "metrics.json").read_text())["eval"] for d in (tiny, tmp_path))
    assert ma["drift"] == mb["drift"] and ma["drift_per_frame_2x"] == mb["drift_per_frame_2x"]


def ctrl_c_in_generator_step(monkeypatch, at):
    """Ctrl-C arrives in the middle of the DMD step `at` (0-based), between its critic updates and
    its generator update."""
    generator_step = sf.generator_step

    def step(st, *rest):
        if st.step == at:
            os.kill(os.getpid(), signal.SIGINT)
        return generator_step(st, *rest)

    monkeypatch.setattr(sf, "generator_step", step)
    return generator_step


def test_ctrl_c_saves_and_resume_equals_straight_run(tiny, tmp_path, monkeypatch, capsys):
    for stage in ("teacher", "ode"):
        shutil.copy(tiny / f"ckpt_{stage}.pt", tmp_path)
    generator_step = ctrl_c_in_generator_step(monkeypatch, 0)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit, match="interrupted after step 1 of stage self_forcing; saved"):
        run(tmp_path, "--stage", "self_forcing")
    assert load(tmp_path / "ckpt_self_forcing.pt")["step"] == 1
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    monkeypatch.setattr(sf, "generator_step", generator_step)
    run(tmp_path, "--stage", "self_forcing")
    a, b = load(tiny / "ckpt_self_forcing.pt"), load(tmp_path / "ckpt_self_forcing.pt")
    assert b["step"] == 2
    for k in ("model", "ema", "critic"):
        assert same_state(a[k], b[k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["rng"]["data"][0], b["rng"]["data"][0]))
    last = capsys.readouterr().out.splitlines()[-1]  # the summary, after the plots
    assert last.startswith("done in") and "held-out prompts" in last and str(tmp_path) in last
    assert "self_forcing " in last and "ckpt_<stage>.pt" in last


def test_stop_in_the_last_step_skips_the_evaluation_until_resumed(tiny, tmp_path, monkeypatch):
    """Stopped in its last step, a stage is saved finished but unevaluated: the resumed run
    evaluates it (the same row as the straight run's) without training it again."""
    for stage in ("teacher", "ode"):
        shutil.copy(tiny / f"ckpt_{stage}.pt", tmp_path)
    generator_step = ctrl_c_in_generator_step(monkeypatch, 1)
    with pytest.raises(SystemExit, match="interrupted after step 2 of stage self_forcing"):
        run(tmp_path, "--stage", "self_forcing")
    assert not (tmp_path / "metrics.json").exists()  # no evaluation when stopping
    saved = digest(tmp_path / "ckpt_self_forcing.pt")
    monkeypatch.setattr(sf, "generator_step", generator_step)
    run(tmp_path, "--stage", "self_forcing")
    assert digest(tmp_path / "ckpt_self_forcing.pt") == saved  # not trained again
    a = json.loads((tiny / "metrics.json").read_text())["eval"]
    b = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert b["step"] == 2 and b["drift"] == a["drift"] and b["drift_2x"] == a["drift_2x"]


def test_resume_with_flags_that_shape_the_stage_is_refused(tiny, tmp_path):
    """Per stage checkpoint: its own flags must match; --stage, evaluation-only flags and flags
    only later stages read may differ."""
    ckpt = load(tiny / "ckpt_teacher.pt")
    ckpt["args"]["teacher_steps"] = 5  # a teacher stopped at step 3 of 5
    torch.save(ckpt, tmp_path / "ckpt_teacher.pt")

    def check(*extra):
        argv = [*TINY, "--out-dir", str(tmp_path), "--teacher-steps", "5", *extra]
        args = tyro.cli(sf.Args, args=argv)
        sf.check_stages(sf.STAGES if args.stage == "all" else (args.stage,), args)

    check("--stage", "teacher", "--eval-clips", "7", "--steps", "9", "--guidance", "2")
    with pytest.raises(
        SystemExit, match="trained with --seed 0 --lr 0.001, not --seed 1 --lr 0.01"
    ):
        check("--lr", "0.01", "--seed", "1")
    with pytest.raises(SystemExit, match="add --accept-changed-args"):
        check("--batch-size", "2")
    check("--batch-size", "2", "--accept-changed-args")
    shutil.copy(tiny / "ckpt_ode.pt", tmp_path)  # finished: not checked, however the flags differ
    check("--stage", "ode", "--lr", "0.01")
    shutil.copy(tiny / "ckpt_self_forcing.pt", tmp_path)  # DMD: --steps and the teacher's shape it
    message = "ckpt_self_forcing.pt was trained with --steps 2 --teacher-steps 3, not --steps 4 --"
    with pytest.raises(SystemExit, match=message):
        check("--stage", "self_forcing", "--steps", "4")


def test_eval_only_reproduces_eval(tiny, tmp_path):
    before = digest(tiny / "ckpt_self_forcing.pt")
    run(tmp_path, "--eval-only", "--ckpt", str(tiny / "ckpt_self_forcing.pt"))
    a = json.loads((tiny / "metrics.json").read_text())["eval"]
    b = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    for k in (
        "drift",
        "drift_2x",
        "drift_per_frame_2x",
        "prompt_alignment",
        "fd_probe",
        "rotation",
    ):
        assert b[k] == a[k], k
    assert digest(tiny / "ckpt_self_forcing.pt") == before and not list(tmp_path.glob("ckpt_*.pt"))
    assert (tmp_path / "samples" / "denoising_self_forcing.png").exists()


def test_eval_only_of_one_stage_names_the_rows_kept_from_earlier_runs(tiny, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(tiny, d)
    run(d, "--eval-only", "--stage", "ode")
    lines = capsys.readouterr().out.splitlines()
    kept = "teacher (evaluated at step 3), self_forcing (evaluated at step 2), tf (evaluated at "
    assert lines[-2].startswith("metrics.json keeps rows of earlier runs: " + kept), lines[-2]
    assert "ode (" not in lines[-2] and lines[-1].startswith("held-out prompts")
    m = json.loads((d / "metrics.json").read_text())
    assert m["eval"]["step"] == 2 and {
        r["step"] for r in m["baselines"].values() if "step" in r
    } == {2, 3}


def test_missing_probe_is_said_before_training(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOWORLD_PROBE", str(tmp_path / "no_probe.pt"))
    run(tmp_path, "--eval-only", "--ckpt", str(tiny / "ckpt_self_forcing.pt"))
    out = capsys.readouterr().out
    assert (
        out.index("warning: no probe at") < out.index("eval self_forcing")
        and "python train_probe.py" in out
    )
    row = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert (
        row["prompt_alignment"] is None and "train_probe.py" in row["prompt_alignment_unavailable"]
    )


def test_generate_writes_gif_and_reports_speed(tiny, tmp_path, capsys):
    shutil.copy(tiny / "ckpt_self_forcing.pt", tmp_path)
    run(
        tmp_path,
        "--generate",
        "A red circle moving from left to right",
        "A white ball bouncing",
        "--frames",
        "12",
    )
    out = capsys.readouterr().out
    assert (
        "frames/s" in out and "first chunk after" in out and (tmp_path / "generated.gif").exists()
    )


def test_torchrun_two_cpu_processes(tiny, tmp_path):
    for stage in (
        "teacher",
        "ode",
    ):  # the DMD stage: exit steps broadcast, gradients averaged by hand
        shutil.copy(tiny / f"ckpt_{stage}.pt", tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train_self_forcing.py",
        *TINY,
        "--out-dir",
        str(tmp_path),
        "--stage",
        "self_forcing",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / "ckpt_self_forcing.pt")
    assert ck["step"] == 2 and len(ck["rng"]["data"]) == 2
    assert not torch.equal(
        ck["rng"]["data"][0][0], ck["rng"]["data"][1][0]
    )  # ranks draw different batches
    assert "world 2" in r.stdout and "4 training clips/rank" in r.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 2


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "bouncing_balls"], "error: --data 'bouncing_balls' has no prompts"),
        (["--resolution", "36"], "error: --resolution 36"),
        (["--frames", "7"], "error: --frames 7 must be a multiple of --chunk 3"),
        (["--ckpt-every", "0"], "error: --ckpt-every 0 must be at least 1"),
        (["--teacher-steps", "-1"], "error: --teacher-steps -1 must be at least 1"),
        (["--ckpt", "/nonexistent/ckpt.pt"], "error: --ckpt /nonexistent/ckpt.pt does not exist"),
        (["--eval-only"], "error: --eval-only needs a checkpoint"),
        (
            ["--generate", "A red circle moving from left to right"],
            "error: --generate needs a checkpoint",
        ),
        (
            ["--generate", "A pink circle moving from left to right"],
            "error: prompt .*unknown word\\(s\\) pink; the vocabulary is",
        ),
        (
            ["--stage", "self_forcing"],
            "error: --stage self_forcing needs .*ckpt_teacher.pt; run --stage teacher first",
        ),
    ],
)
def test_bad_input_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, *extra)
    assert "\n" not in str(e.value.code)
    assert not list(tmp_path.glob("ckpt_*.pt"))


def test_checkpoints_of_another_script_or_architecture_are_refused(tiny, tmp_path):
    torch.save({"script": "train_river.py", "step": 3, "model": {}}, tmp_path / "ckpt_teacher.pt")
    with pytest.raises(SystemExit, match="error: .*written by train_river.py"):
        run(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: cannot read checkpoint"):
        run(tmp_path, "--eval-only", "--ckpt", str(tmp_path / "bad.pt"))
    d = tmp_path / "run"
    shutil.copytree(tiny, d)
    good = digest(d / "ckpt_teacher.pt")
    with pytest.raises(SystemExit, match="error: .*another architecture: width=32 \\(now 64\\)"):
        run(d, "--width", "64")
    message = "error: .*ckpt_teacher.pt was trained with --teacher-steps 3 --lr 0.001, not"
    with pytest.raises(SystemExit, match=message):  # would reshape the teacher's schedule: refused
        run(d, "--teacher-steps", "6", "--lr", "1e30", "--ckpt-every", "100")
    with pytest.raises(SystemExit, match="error: non-finite loss .* in stage teacher"):
        run(
            d,
            "--accept-changed-args",
            "--teacher-steps",
            "6",
            "--lr",
            "1e30",
            "--ckpt-every",
            "100",
        )
    assert digest(d / "ckpt_teacher.pt") == good
