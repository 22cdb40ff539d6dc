"""train_self_forcing.py: the algorithm's invariants (reference section 6), CLI, outputs, determinism, resume, DDP, bad input."""

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import tyro
from conftest import torchrun

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


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def short_probe(tmp_path_factory):
    """A probe of 60 steps (about 10 s; the default trains 1200) for every run of this module:
    the scores that need one are computed whether or not `python train_probe.py` has cached one.
    Such probes of seeds 0-2 put black, frozen, shuffled and noise videos 8-42x above real clips
    on fd_window; the cached probe, 20x or more (docs/results/train_self_forcing.md)."""
    path = tmp_path_factory.mktemp("probe") / "probe.pt"
    cmd = [sys.executable, "train_probe.py", "--steps", "60", "--n-per-kind", "16"]
    r = subprocess.run(
        [*cmd, "--out", str(path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return path


@pytest.fixture(scope="module", autouse=True)
def probe_env(short_probe):
    """Every in-process run of this module scores with the short probe."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOWORLD_PROBE", str(short_probe))
        yield


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


def test_model_sees_frames_by_their_place_in_the_window_not_their_absolute_index():
    """The same frames at another start give the same x0 (RoPE turns by differences, the frame
    embedding counts from the first visible frame); the frame embedding still tells frames apart."""
    model, (x, words) = random_model(), inputs(T=4)
    with torch.no_grad():
        moved = (sf.predict_x0(model, x, 0.5, words, pos)[0] for pos in (0, 21))
        assert (next(moved) - next(moved)).abs().max() < 1e-4
        before = sf.predict_x0(model, x, 0.5, words)[0]
        torch.nn.init.zeros_(model.frame.weight), torch.nn.init.zeros_(model.frame.bias)
        assert (sf.predict_x0(model, x, 0.5, words)[0] - before).abs().max() > 1e-3


def test_visible_index_by_hand():
    """Index from the first visible frame: a bidirectional clip counts 0..T-1; a window of 6
    (chunks of 3) starts over once it rolls; 6 cached frames come before a chunk's own."""
    assert sf.visible_index(5, None, None, 4, "cpu").tolist() == [0, 1, 2, 3, 4]
    rolled = sf.visible_index(12, None, sf.frame_mask(12, 3, 6), 4, "cpu")
    assert rolled.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5]
    kv = [(torch.zeros(1, 2, 6 * 4, 8), torch.zeros(1, 2, 6 * 4, 8))]
    assert sf.visible_index(3, kv, None, 4, "cpu").tolist() == [6, 7, 8]
    ahead = sf.visible_index(6, kv[:1], sf.frame_mask(6, 3, 9, cached=6), 4, "cpu")
    assert ahead.tolist() == [6, 7, 8, 6, 7, 8]  # the fused context pass: the next chunk rolled


def test_frame_mask_after_a_cache_is_the_tail_of_the_full_mask():
    """The mask of the fused context pass: queries after `cached` frames of keys are rows of the whole video's mask."""
    assert torch.equal(sf.frame_mask(6, 3, 0, cached=6), sf.frame_mask(12, 3)[6:])
    assert torch.equal(
        sf.frame_mask(6, 3, 6, cached=3), sf.frame_mask(12, 3, 6)[6:, 3:]
    )  # a rolled cache: 3 of 6 frames kept
    assert not sf.frame_mask(6, 3, 6, cached=3)[
        :3, -3:
    ].any()  # the context chunk never sees the next chunk
    for frames, chunk, window, cached in ((6, 3, 0, 6), (12, 3, 0, 0), (6, 3, 6, 3), (12, 3, 6, 0)):
        want = plain_frame_mask(frames, chunk, window, cached)  # independent: a plain loop
        assert torch.equal(sf.frame_mask(frames, chunk, window, cached=cached), want)


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
    with torch.no_grad():  # independent: the scores written out with the models themselves
        xt = x + sigma.view(-1, 1, 1, 1, 1) * (noise - x)
        s = sigma[:, None].expand(2, x.shape[1])
        c, u = (teacher(xt, s, w)[0] for w in (words, torch.zeros_like(words)))
        real = c + 3.0 * (c - u)
        norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        want = (critic(xt, s, words)[0] - real) / norm
    torch.testing.assert_close(x.grad * x.numel(), want, rtol=1e-3, atol=1e-4)
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


# ----------------------------------------------------------------------------- pinned against independent computations
class FixedVideo(torch.nn.Module):
    """Stand-in generator: whatever it is given, its x0 of frames [pos, pos + T) is one fixed video
    (a parameter); it records every call (input, sigma, position, gradient on)."""

    def __init__(self, video, chunk=2):
        super().__init__()
        self.video = torch.nn.Parameter(video.clone())
        self.chunk, self.window, self.tokens = chunk, 0, 1
        self.calls = []

    def forward(self, x, sigma, words, pos=0, mask=None, kv=None):
        self.calls.append(
            (x.detach().clone(), sigma.detach().clone(), pos, torch.is_grad_enabled())
        )
        return self.video[pos : pos + x.shape[1]] + 0 * x, []


class AffineX0(torch.nn.Module):
    """Stand-in score network: x0 = a x_t + b + p w, w = (sum of the word ids) / 100 (0 for the null
    prompt); it records the sigma and word ids of every call."""

    def __init__(self, a, b, p):
        super().__init__()
        self.a, self.b, self.p = (torch.nn.Parameter(torch.tensor(float(v))) for v in (a, b, p))
        self.sigmas, self.words = [], []

    def forward(self, x, sigma, words, pos=0, mask=None, kv=None):
        self.sigmas.append(sigma[:, 0].detach().clone())
        self.words.append(words.clone())
        return self.a * x + self.b + self.p * prompt_weight(words), []


def prompt_weight(words):
    return (words.sum(-1).double() / 100).view(-1, 1, 1, 1, 1)


def batch_words(n):
    """n prompts in turn (their word-id sums differ, so each sample gets its own scores)."""
    return torch.tensor([sf.encode_prompt(sf.HOLDOUT[i % len(sf.HOLDOUT)]) for i in range(n)])


TEACHER = (0.0, 0.1, 0.6)  # a, b, p of the stand-in teacher and critic: x0 independent of x_t
CRITIC = (0.0, -0.2, 0.3)


def standin_stage(batch=4, frames=4, chunk=2, seed=0):
    """A self_forcing Stage of stand-ins: generator = FixedVideo, teacher and critic = AffineX0."""
    g = torch.Generator().manual_seed(seed)
    model = FixedVideo(0.5 + 0.3 * torch.randn(frames, 3, 4, 4, generator=g), chunk)
    teacher, critic = AffineX0(*TEACHER).requires_grad_(False), AffineX0(*CRITIC)
    st = sf.Stage(
        name="self_forcing",
        model=model,
        net=model,
        ema=copy.deepcopy(model),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        opt=torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.999)),
        gen=torch.Generator().manual_seed(seed + 1),
        ngen=torch.Generator().manual_seed(seed + 2),
        sigmas=sf.few_step_sigmas(),
        total=1,
        batch=batch,
        base_lr=1e-3,
        teacher=teacher,
        critic=critic,
        opt_critic=torch.optim.AdamW(critic.parameters(), lr=1e-3, betas=(0.0, 0.999)),
    )
    rt = sf.Runtime(torch.device("cpu"), "float32", nullcontext(), False, 0, 1, False, True)
    real = torch.randn(batch, frames, 3, 4, 4, generator=g)  # real clips: unlike the fixed video
    return st, rt, real, batch_words(batch)


def hand_dmd_gradient(x, xt, words, teacher, critic, guidance):
    """DMD by hand: real = c + w (c - u) from the teacher, fake from the critic (conditional),
    g = (fake - real) / mean|x - real| per sample."""
    (ta, tb, tp), (ca, cb, cp) = teacher, critic
    w = prompt_weight(words)
    u = ta * xt + tb
    c = u + tp * w
    real = c + guidance * (c - u)
    fake = ca * xt + cb + cp * w
    norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    return (fake - real) / norm


def test_dmd_gradient_is_fake_minus_guided_real_over_per_sample_norm():
    """dmd_loss: d loss / dx = g / numel with g = (x0_fake - x0_real) / mean|x - x0_real| per
    sample, x0_real = c + w (c - u) from the teacher, x0_fake from the critic, both at
    x_t = (1 - sigma) x + sigma noise (stand-ins with known linear x0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 4, 4, generator=g)
    noise = torch.randn(x.shape, generator=g)
    sigma, words, guidance = torch.tensor([0.3, 0.8, 0.55]), batch_words(3), 3.0
    t_abp, c_abp = (0.7, 0.1, 0.5), (0.4, -0.3, 0.2)
    xd = x.double()
    s = sigma.double().view(-1, 1, 1, 1, 1)
    xt = (1 - s) * xd + s * noise.double()
    want = hand_dmd_gradient(xd, xt, words, t_abp, c_abp, guidance)
    teacher, critic = AffineX0(*t_abp), AffineX0(*c_abp)
    x.requires_grad_(True)
    loss, got = sf.dmd_loss(x, teacher, critic, words, sigma, noise, guidance)
    loss.backward()
    torch.testing.assert_close(x.grad.double() * x.numel(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # the real score is the teacher on [prompt; null prompt], the fake score the critic, prompted
    assert [len(w) for w in teacher.words] == [6] and not teacher.words[0][3:].any()
    assert torch.equal(critic.words[0], words)


def test_generator_step_real_score_is_the_teacher_and_fake_score_the_critic():
    """generator_step: the generator's parameters get (1/numel) sum over the batch of
    g = (critic x0 - teacher CFG x0) / mean|video - teacher CFG x0|, for its rollout video (stand-ins
    whose x0 does not depend on x_t: the expected gradient is known without the noise)."""
    st, rt, real, words = standin_stage()
    video = st.model.video.detach().clone().double()
    want = hand_dmd_gradient(video[None], 0.0, words, TEACHER, CRITIC, 3.0).expand(4, *video.shape)
    loss, g, s = sf.generator_step(st, real, words, sf.Args(guidance=3.0), rt)
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6)
    numel = real.numel()
    torch.testing.assert_close(
        st.model.video.grad.double(), want.sum(0) / numel, rtol=1e-4, atol=1e-9
    )
    assert torch.equal(st.teacher.sigmas[0], torch.cat([st.critic.sigmas[0]] * 2))  # the same t


def test_critic_learns_the_generators_rollouts_not_real_clips():
    """critic_step: flow matching of the critic on the generator's rollout (detached), not on the
    real clips: with a critic x0 = b + p w (no x_t), the loss is mean (b + p w - rollout)^2 and
    dloss/db = 2 mean(b + p w - rollout); the generator gets no gradient."""
    st, rt, real, words = standin_stage()
    fake = st.model.video.detach().clone()[None].double()
    _, b, p = CRITIC
    err = b + p * prompt_weight(words) - fake
    loss = sf.critic_step(st, real, words, sf.Args(), rt).detach()
    assert float(loss) == pytest.approx(float(err.square().mean()), rel=1e-5)
    assert float(st.critic.b.grad) == pytest.approx(float(2 * err.mean()), rel=1e-4)
    assert st.model.video.grad is None  # no gradient reaches the generator
    assert float(loss) != pytest.approx(
        float((b + p * prompt_weight(words) - real).square().mean()), rel=1e-2
    )


@pytest.mark.parametrize("ratio", [None, 2])
def test_critic_updates_per_generator_update_counted(ratio):
    """train_step: per generator update, --critic-updates critic optimizer steps (default 5, the
    paper's dfake_gen_update_ratio), counted by AdamW's own step counters."""
    st, rt, *_ = standin_stage(batch=2)
    videos = (torch.rand(6, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255).byte()
    args = sf.Args() if ratio is None else sf.Args(critic_updates=ratio)
    for _ in range(2):
        sf.train_step(st, (videos, batch_words(6)), args, rt)
    want = 5 if ratio is None else ratio
    assert [float(s["step"]) for s in st.opt_critic.state.values()] == [2.0 * want] * 3
    assert [float(s["step"]) for s in st.opt.state.values()] == [2.0]


def test_generators_rollout_exit_step_is_uniform_over_the_denoising_steps():
    """student_sample: the exit step s is uniform on {0..3} over many rollouts, and the rollout's
    one grad-enabled forward per chunk runs at sigma_s (steps after it never run)."""
    st, rt, real, words = standin_stage(batch=1)
    sigmas = (1000 * sf.few_step_sigmas()).tolist()
    draws = []
    for _ in range(800):
        st.model.calls.clear()
        _, _, s = sf.student_sample(st, real, words, rt)
        draws.append(s)
        graded = [1000 * float(sig.flatten()[0]) for _, sig, _, grad in st.model.calls if grad]
        assert graded == pytest.approx([sigmas[s]] * 2)  # 2 chunks
        assert len(st.model.calls) == 2 * (s + 1) + 1  # plus one cache pass
    freq = torch.bincount(torch.tensor(draws), minlength=4) / len(draws)
    assert (freq - 0.25).abs().max() < 0.05, freq


def test_renoising_uses_fresh_noise_at_the_next_sigma():
    """rollout: between steps x = (1 - sigma') x0 + sigma' eps with eps fresh N(0, 1) noise, not the
    chunk's starting noise: with x0 a fixed video, eps = (x - (1 - sigma') x0) / sigma' has mean 0,
    std 1 and no correlation with the chunk's noise or the previous step's eps."""
    video = 0.5 + 0.3 * torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = FixedVideo(video)
    noise = torch.randn(4, 8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigmas = sf.few_step_sigmas()
    with torch.no_grad():
        sf.rollout(model, noise, batch_words(4), sigmas, torch.Generator().manual_seed(2))
    renoised = [(x, float(s.flatten()[0]), p) for x, s, p, _ in model.calls if x.shape[1] == 2]
    renoised = [r for r in renoised if r[1] < 1]
    assert [s for _, s, _ in renoised] == pytest.approx(sigmas[1:].tolist() * 4)
    previous = None
    for x, s, pos in renoised:
        eps = (x - (1 - s) * video[pos : pos + 2]) / s
        start = noise[:, pos : pos + 2]
        assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05, (pos, s)
        assert abs(torch.corrcoef(torch.stack([eps.flatten(), start.flatten()]))[0, 1]) < 0.1
        if previous is not None and previous.shape == eps.shape:
            assert abs(torch.corrcoef(torch.stack([eps.flatten(), previous.flatten()]))[0, 1]) < 0.1
        previous = eps


def inverse_shift(sigma, k):
    """s of sigma = k s / (1 + (k - 1) s), the shift map written out."""
    return sigma / (k - (k - 1) * sigma)


@pytest.mark.parametrize("shift", [5.0, 3.0])
def test_sample_sigma_follows_the_shifted_grid(shift):
    """sample_sigma: t ~ U{0..999} on the grid s = 1 - t / 1000, then sigma = k s / (1 + (k - 1) s):
    the inverse map of the draws is uniform on the grid (KS distance) and lands on grid points."""
    n = 20000
    sigma = sf.sample_sigma(n, shift, torch.Generator().manual_seed(0), "cpu").double()
    s = inverse_shift(sigma, shift)
    assert ((s * 1000).round() - s * 1000).abs().max() < 1e-2 and s.min() >= 0.001 - 1e-6
    ks = (s.sort().values - (torch.arange(n) + 0.5) / n).abs().max()
    assert ks < 0.015, ks


def test_dmd_and_critic_sigma_are_shifted_and_clamped():
    """critic_step and generator_step draw one sigma per video by the shifted grid (k = --shift),
    clamped to [0.02, 0.98]: the inverse shift map of the draws has the uniform's quantiles; the real
    and fake scores see the same sigma."""
    st, rt, real, words = standin_stage(batch=1024, frames=2)
    args = sf.Args()
    sf.critic_step(st, real, words, args, rt)
    sf.generator_step(st, real, words, args, rt)
    critic_draw, generator_draw = st.critic.sigmas
    assert torch.equal(st.teacher.sigmas[0], torch.cat([generator_draw] * 2))
    for sigma in (critic_draw, generator_draw):
        assert sigma.min() >= 0.02 - 1e-6 and sigma.max() == pytest.approx(0.98)
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.85])
        s = inverse_shift(sigma.double().quantile(q.double()), args.shift)
        assert (s - q).abs().max() < 0.05, s


def test_ema_update_equals_a_plain_loop():
    """ema_update: after k updates ema = d ema + (1 - d) model each time (d = 0.9, model weights
    changing every step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(model)
    want = [p.detach().clone() for p in ema.parameters()]
    for k in range(4):
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * (k + 1))
        sf.ema_update(ema, model, 0.9)
        want = [0.9 * e + 0.1 * p.detach() for e, p in zip(want, model.parameters())]
    for e, w in zip(ema.parameters(), want):
        torch.testing.assert_close(e.detach(), w, rtol=1e-6, atol=1e-6)


def test_train_loop_ema_starts_at_a_third_with_decay_099(monkeypatch, tmp_path):
    """train_loop: the EMA copies the model for the first third of the steps, then follows it with
    decay 0.99 (the paper's: from step 200 of 600), checked against a plain loop."""
    values = [1.0, 3.0, 10.0, 30.0, 100.0, 300.0]

    def fake_train_step(st, data, args, rt):
        for p in st.model.parameters():
            p.data.fill_(values[st.step])
        return [0.0]

    monkeypatch.setattr(sf, "train_step", fake_train_step)
    st, rt, *_ = standin_stage()
    st.name, st.critic, st.opt_critic, st.total = "teacher", None, None, len(values)
    args = sf.Args(out_dir=str(tmp_path), log_every=100, eval_every=100, sample_every=100)
    sf.train_loop(st, None, args, rt, None, None)
    ema = 0.0
    for step, v in enumerate(values):
        decay = 0.99 if step >= len(values) // 3 else 0.0
        ema = decay * ema + (1 - decay) * v
    assert float(st.ema.video.detach().flatten()[0]) == pytest.approx(ema, rel=1e-5)


def plain_frame_mask(frames, chunk, window=0, cached=0):
    """Block-causal by a loop over (query, key) frames: keys are `cached` earlier frames, then the
    queries; chunks are counted in absolute frames (the queries start a chunk); query frame i sees
    key frame j iff chunk(j) <= chunk(i) and j is among the last `window` frames up to the end of
    i's chunk (window 0: all)."""
    start = -(-cached // chunk) * chunk  # absolute index of the first query frame
    mask = torch.zeros(frames, cached + frames, dtype=torch.bool)
    for i in range(frames):
        qi = start + i
        for j in range(cached + frames):
            kj = start - cached + j
            end = (qi // chunk + 1) * chunk
            mask[i, j] = kj // chunk <= qi // chunk and (window == 0 or end - kj <= window)
    return mask


@pytest.mark.parametrize(
    "frames, chunk, window, cached",
    [
        (12, 3, 0, 0),
        (12, 3, 9, 0),
        (12, 3, 5, 0),
        (8, 2, 5, 0),
        (6, 3, 6, 3),
        (4, 2, 5, 3),
        (6, 3, 0, 6),
    ],
)
def test_frame_mask_equals_a_plain_loop(frames, chunk, window, cached):
    """frame_mask: frame i attends frame j iff chunk(j) <= chunk(i) and j is within the window."""
    assert torch.equal(
        sf.frame_mask(frames, chunk, window, cached=cached),
        plain_frame_mask(frames, chunk, window, cached),
    )


def test_flow_matching_loss_by_hand():
    """flow_matching_loss: mean (x0_hat(x_t) - x0)^2 at x_t = (1 - sigma) x0 + sigma noise, one
    sigma per video (a linear stand-in x0_hat = a x_t + b + p w)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    sigma, words = torch.tensor([0.2, 0.9]), batch_words(2)
    s = sigma.double().view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0.double() + s * noise.double()
    want = (0.6 * xt - 0.1 + 0.4 * prompt_weight(words) - x0.double()).square().mean()
    got = sf.flow_matching_loss(AffineX0(0.6, -0.1, 0.4), x0, words, sigma, noise)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)


def test_teacher_step_drops_one_prompt_in_ten():
    """teacher_step: flow matching with the prompt replaced by the null prompt (all 0) for 10% of
    the videos (what CFG needs), the others unchanged."""
    st, rt, *_ = standin_stage()
    model = AffineX0(0.5, 0.0, 0.1)
    st.name, st.model, st.net = "teacher", model, model
    st.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = 4000
    words = batch_words(n)
    x = torch.randn(n, 2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    sf.teacher_step(st, x, words, sf.Args(), rt)
    seen = model.words[0]
    null = ~seen.any(-1)
    assert abs(float(null.float().mean()) - 0.1) < 0.015
    assert torch.equal(seen[~null], words[~null])


class Echo(torch.nn.Module):
    """Stand-in student: x0 = its input; records input, sigma and mask."""

    def __init__(self, chunk, window):
        super().__init__()
        self.chunk, self.window = chunk, window
        self.calls = []

    def forward(self, x, sigma, words, pos=0, mask=None, kv=None):
        self.calls.append((x, sigma, mask))
        return x + 0.0, []


def test_ode_regression_each_chunk_picks_its_own_state_and_sigma():
    """ode_regression_loss: each chunk takes trajectory state k (uniform over the K states, drawn per
    chunk) with its noise level sigmas[k], one forward under the block-causal mask; the loss is
    mse(x0, the trajectory's end)."""
    B, K, T, c = 512, 4, 6, 2
    sigmas = sf.few_step_sigmas()
    k = torch.arange(K).view(1, K, 1, 1, 1, 1).float()
    t = torch.arange(T).view(1, 1, T, 1, 1, 1).float()
    states = (k + 0.01 * t).expand(B, K, T, 1, 2, 2).contiguous()
    target = torch.randn(B, T, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model = Echo(c, 4)
    loss = sf.ode_regression_loss(
        model, states, target, batch_words(B), sigmas, torch.Generator().manual_seed(1)
    )
    ((x, sigma, mask),) = model.calls
    picked = (x[:, :, 0, 0, 0] - 0.01 * torch.arange(T)).round().long()  # (B, T): the state index
    assert torch.equal(picked, picked[:, ::c].repeat_interleave(c, 1))  # one state per chunk
    torch.testing.assert_close(sigma, sigmas[picked])
    freq = torch.bincount(picked.flatten(), minlength=K) / picked.numel()
    assert (freq - 1 / K).abs().max() < 0.03, freq
    differ = (picked[:, 0] != picked[:, c]).float().mean()  # independent draws: 3/4 differ
    assert abs(float(differ) - 0.75) < 0.06, differ
    assert torch.equal(mask, plain_frame_mask(T, c, 4))
    assert float(loss) == pytest.approx(float((x - target).square().mean()), rel=1e-5)


def test_teacher_ode_is_euler_with_cfg_and_its_states_sit_at_the_few_step_sigmas(tmp_path):
    """sample_teacher: Euler x' = x0 + sigma' (x - x0) / sigma on the shifted grid with x0 =
    c + w (c - u) (a plain loop with a linear stand-in teacher); make_ode_pairs keeps the states at
    the student's few-step sigmas: with x0 = 0, state k = sigma_k noise (sigma_0 = 1)."""
    words = batch_words(3)
    noise = torch.randn(3, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    steps, shift, guidance = 8, 3.0, 2.0
    grid = [shift * s / (1 + (shift - 1) * s) for s in torch.linspace(1, 0, steps + 1).tolist()]
    x, want_states, w = noise.double(), [], prompt_weight(words)
    for i in range(steps):
        if i in (0, 3):
            want_states.append(x)
        u = 0.4 * x + 0.1
        c = u + 0.5 * w
        x0 = c + guidance * (c - u)
        x = x0 + grid[i + 1] * (x - x0) / grid[i]
    end, states = sf.sample_teacher(
        AffineX0(0.4, 0.1, 0.5), noise, words, steps, shift, guidance, keep=(0, 3)
    )
    torch.testing.assert_close(end.double(), x, rtol=1e-4, atol=1e-5)
    for got, want in zip(states, want_states, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    args = sf.Args(frames=2, resolution=4, guidance=guidance)
    rt = sf.Runtime(torch.device("cpu"), "float32", nullcontext(), False, 0, 1, False, True)
    states, ends = sf.make_ode_pairs(AffineX0(0.0, 0.0, 0.0), words, args, rt, seed=0)
    ratio = states.float() / states[:, :1].float()
    want = sf.few_step_sigmas(4, args.shift).view(1, 4, 1, 1, 1, 1).expand_as(ratio)
    torch.testing.assert_close(ratio, want, rtol=2e-3, atol=2e-3)
    assert ends.abs().max() == 0


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
            "fd_window",
            "fd_window_2x",
            "rotation",
            "rotation_2x",
            "rotation_share",
            "gen_frames_per_s_4x_nocache",
            "gen_frames_per_s_4x_window",
            "kv_speedup_4x",
            "kv_speedup_window_4x",
            "first_chunk_latency_s",
            "first_chunk_latency_s_window",
        } <= row.keys()
        assert (  # windows of 2 chunks of 3 frames, one a chunk: 6 frames hold 1, 12 hold 3
            len(row["fd_window_per_window"]) == 1
            and len(row["fd_window_per_window_2x"]) == 3
            and row["gen_frames_per_s"] > 0
        )
    mse = m["baselines"]["teacher"]["direction_word_mse"]
    assert set(mse) == {"0.95", "0.98", "1.0"} and all(len(v) == 2 for v in mse.values())
    assert set(m["fd_window_controls"]) == {"real", "black", "frozen", "shuffled", "noise"}
    assert (
        "gen_frames_per_s" in m["baselines"]["teacher"]
        and "kv_speedup_1x" not in m["baselines"]["teacher"]
    )
    assert set(m["perf"]["stages"]) == set(sf.STAGES) and m["perf"]["kv_speedup_4x"] > 0
    for f in (
        "samples/denoising_self_forcing.png",
        "samples/self_forcing_latest.png",
        "plots/attention_masks.png",
        "plots/fd_window.png",
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
    assert ma["fd_window_per_window_2x"] == mb["fd_window_per_window_2x"]


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
    assert b["step"] == 2 and b["fd_window_2x"] == pytest.approx(a["fd_window_2x"], rel=1e-6)


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
        "fd_window",
        "fd_window_2x",
        "fd_window_per_window_2x",
        "prompt_alignment",
        "fd_probe",
        "rotation",
    ):
        # not bitwise: with MKL's AVX2 kernels the same weights score apart in the 9th digit
        assert b[k] == pytest.approx(a[k], rel=1e-6), k
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


@pytest.mark.slow  # fresh processes: the world model's torchrun test covers the shared DDP code fast
def test_torchrun_two_cpu_processes(tiny, tmp_path):
    for stage in (
        "teacher",
        "ode",
    ):  # the DMD stage: exit steps broadcast, gradients averaged by hand
        shutil.copy(tiny / f"ckpt_{stage}.pt", tmp_path)
    args = [
        "train_self_forcing.py",
        *TINY,
        "--out-dir",
        str(tmp_path),
        "--stage",
        "self_forcing",
    ]
    r = torchrun(args, ENV)
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
        # a --data-dir is never ignored: its kind is implied (no prompts), or it stops
        (["--data-dir", str(ROOT / "assets")], "error: --data .folder. has no prompts"),
        (["--data-dir", "/nonexistent"], "error: --data-dir /nonexistent does not exist"),
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


# ------------------------------------------------------------- long videos: baselines and scores
def test_window_recompute_baseline_runs_the_window_once_per_chunk():
    """cache="window": before each chunk, its window's clean frames (at most window - chunk) run
    once at t = 0, then the chunk's steps use their keys; with a window holding every frame that
    is the cache itself, with a rolling window it is not (those frames see only each other)."""
    (noise, words), sigmas = inputs(T=8), sf.few_step_sigmas()
    outs = {}
    for window in (0, 4):
        for cache in (True, "window"):
            model = random_model(window)
            calls = record_calls(model)
            with torch.no_grad():
                outs[window, cache] = sf.rollout(
                    model, noise, words, sigmas, torch.Generator().manual_seed(3), cache=cache
                )
            if cache == "window":
                context = [frames for frames, sigma, *_ in calls if sigma == 0.0]
                assert context == ([2, 4, 6] if window == 0 else [2, 2, 2])  # chunks 1, 2, 3
                assert len(calls) == 3 + 4 * len(sigmas)  # nothing else: no context pass after
    assert (outs[0, True] - outs[0, "window"]).abs().max() < 1e-5
    assert (outs[4, True] - outs[4, "window"]).abs().max() > 1e-4


def test_direction_probe_flips_only_the_direction_word():
    assert sf.flip_direction("A red square rotating clockwise") == (
        "A red square rotating counter-clockwise"
    )
    assert sf.flip_direction("A red square rotating counter-clockwise").endswith(" clockwise")
    args = sf.Args(resolution=16, frames=4, chunk=2)
    rt = types.SimpleNamespace(device="cpu", amp=nullcontext())
    model = random_model()
    differ = sf.direction_probe(model, args, rt, n=4)
    cw, ccw = sf.VOCAB.index("clockwise"), sf.VOCAB.index("counter-clockwise")
    with torch.no_grad():
        model.word.weight[ccw] = model.word.weight[cw]  # the model can no longer tell them apart
    same = sf.direction_probe(model, args, rt, n=4)
    assert set(same) == {"0.95", "0.98", "1.0"}
    for sigma in same:
        assert same[sigma][0] == pytest.approx(same[sigma][1], abs=1e-7)
        assert abs(differ[sigma][0] - differ[sigma][1]) > 1e-5


def test_fd_window_ranks_real_clips_above_black_frozen_shuffled_and_noise():
    """The long-video score's check: the held-out prompts' real steady clips against other
    layouts of them beat black, frozen, time-shuffled and noise videos by 3x or more, at 1x and
    2x; rotation_share reads real rotating clips as turning and frozen ones as not."""
    args = sf.Args(eval_clips=35)
    ev = sf.eval_set(args)
    c = ev["controls"]
    for key in ("fd_window", "fd_window_2x"):
        worst_bad = min(c[k][key] for k in ("black", "frozen", "shuffled", "noise"))
        assert 3 * c["real"][key] < worst_bad, (key, c)
    assert ev["real"]["rotation_share"] == 1.0 and ev["real"]["rotation_share_2x"] == 1.0
    frozen = ev["videos"][:, :1].expand_as(ev["videos"])
    assert sf.score(frozen[:, :12], ev)["rotation_share"] == 0.0
