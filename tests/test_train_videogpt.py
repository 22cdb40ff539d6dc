"""train_videogpt.py: the prior against a written-out transformer, causality, the KV cache, position
code, loss and bits, sampling (temperature, top-k, kept context), the first stage's codes; CLI and
outputs, determinism, resume, eval-only, DDP, bad input."""

import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tyro
from conftest import torchrun

import train_videogpt as tg
import train_vqvae as tv  # the tests make a first stage with it; the script itself never imports it

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: more threads only contend on a busy CPU

VQ_TINY = (  # a 3D first stage on 16 px clips of 4 frames -> 2 x 2 x 2 codes of 8
    "--data bouncing_balls --resolution 16 --frames 4 --temporal-downsample 2 "
    "--width 4 --latent-channels 3 --codebook-size 8 --no-attention"
).split()
TINY = (
    "--data bouncing_balls --resolution 16 --frames 4 --context 2 --steps 4 --log-every 1 "
    "--eval-every 2 --sample-every 2 --ckpt-every 2 --train-clips 6 --eval-clips 3 --samples 3 "
    "--bench-samples 2 --width 12 --heads 2 --layers 1 --batch-size 3 --dropout 0.1 "
    "--dtype float32 --no-compile --device cpu --warmup-steps 1"
).split()


def run(out_dir, first_stage, *extra):
    args = [*TINY, "--vqvae", str(first_stage), "--out-dir", str(out_dir), *extra]
    tg.main(tyro.cli(tg.Args, args=args))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def first_stage_model(one_thread):
    """A tiny spatio-temporal VQ-VAE as train_vqvae.py builds it for VQ_TINY, its codes set from its
    own encoder outputs (untrained: the prior's tests need its interface, not its quality)."""
    args = tyro.cli(tv.Args, args=VQ_TINY)
    torch.manual_seed(0)
    vq = tv.build_model(tv.model_arch(args, 3)).eval()
    with torch.no_grad():
        tv.init_codebook(vq, vq.encode(torch.rand(2, 4, 3, 16, 16)))
    return vq, args


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory, first_stage_model):
    """Its export, written by train_vqvae.py's own functions."""
    vq, args = first_stage_model
    out = tmp_path_factory.mktemp("vqvae3d")
    stats = {"latent_mean": [0.0] * 3, "latent_std": [1.0] * 3}
    tv.export_first_stage(vq, str(out), tv.first_stage_meta(args, 3, 0, {}, stats, vq.codebook))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, first_stage):
    out = tmp_path_factory.mktemp("tiny")
    run(out, first_stage)
    return out


def tiny_model(seed=0, grid=(2, 2, 3), K=7, width=12, layers=2):
    """A random prior in eval mode with a random (not zero) head, so logits depend on the input."""
    torch.manual_seed(seed)
    model = tg.VideoGPT(torch.randn(K, 3), grid, width, 2, layers, 0.0, 0.0).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        for p in model.pos:
            p.normal_()
    return model


# ----------------------------------------------------------------------------- the method, pinned
# Every test below checks the script against a computation written out here, never against its
# own output. tests/mutants/train_videogpt.py lists the single-line breaks they catch.
def reference_logits(model, codes):
    """The prior written out with plain tensor ops: start token + codebook vectors of the codes
    shifted right, plus concat(E_t[t], E_h[h], E_w[w]) at (t, h, w) = unravel_index(n); pre-LN
    blocks of causal softmax attention and an MLP with x * sigmoid(1.702 x); final LN; head."""
    B, N = codes.shape
    grid = model.grid
    E = [p.detach() for p in model.pos]
    pos = torch.stack(
        [torch.cat([E[a][i] for a, i in enumerate(np.unravel_index(n, grid))]) for n in range(N)]
    )
    x = torch.stack(
        [
            torch.stack(
                [model.sos] + [model.embed.weight @ model.codebook[c] for c in codes[b, :-1]]
            )
            for b in range(B)
        ]
    )
    h = x + pos
    for block in model.blocks:
        a = F.layer_norm(h, (h.shape[-1],), block.norm1.weight, block.norm1.bias)
        q, k, v = (a @ block.attn.qkv.weight.t()).chunk(3, -1)
        heads = block.attn.heads
        d = q.shape[-1] // heads
        out = torch.zeros_like(q)
        for i in range(N):
            for hd in range(heads):
                s = slice(hd * d, (hd + 1) * d)
                w = torch.softmax((k[:, : i + 1, s] @ q[:, i, s, None])[..., 0] / math.sqrt(d), -1)
                out[:, i, s] = (w[..., None] * v[:, : i + 1, s]).sum(1)
        h = h + out @ block.attn.proj.weight.t() + block.attn.proj.bias
        a = F.layer_norm(h, (h.shape[-1],), block.norm2.weight, block.norm2.bias)
        lin1, lin2 = block.mlp[0], block.mlp[2]
        u = a @ lin1.weight.t() + lin1.bias
        h = h + (u * torch.sigmoid(1.702 * u)) @ lin2.weight.t() + lin2.bias
    h = F.layer_norm(h, (h.shape[-1],), model.norm.weight, model.norm.bias)
    return h @ model.head.weight.t()


def test_forward_equals_a_written_out_transformer():
    model = tiny_model()
    codes = torch.randint(7, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(codes)
        want = reference_logits(model, codes)
    assert got.shape == (2, 12, 7)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_position_code_is_the_concatenation_of_three_tables():
    """Token n = (t, h, w) in raster order (itertools.product over the grid) gets
    concat(E_t[t], E_h[h], E_w[w])."""
    model = tiny_model(grid=(2, 3, 4))
    got = model.positions()
    for n, (t, h, w) in enumerate(itertools.product(range(2), range(3), range(4))):
        want = torch.cat([model.pos[0][t], model.pos[1][h], model.pos[2][w]])
        assert torch.equal(got[n], want), n


def test_a_later_code_never_changes_an_earlier_logit():
    """Changing code j leaves the logits at 0..j bit-identical (they predict codes 0..j from the
    codes before them) and changes the logits at j + 1."""
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(7, (1, 12), generator=g)
    with torch.no_grad():
        base = model(codes)
        for j in range(11):
            other = codes.clone()
            other[0, j] = (codes[0, j] + 1) % 7
            changed = model(other)
            assert torch.equal(changed[:, : j + 1], base[:, : j + 1]), j
            assert not torch.allclose(changed[:, j + 1], base[:, j + 1]), j


def test_cached_logits_equal_the_full_forward():
    """Teacher-forcing through the KV cache (a prefix of 5 in one pass, then one token at a time)
    gives every logit of the full causal pass (fp32, 1e-5)."""
    model = tiny_model()
    codes = torch.randint(7, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(codes)
        caches = [{} for _ in model.blocks]
        parts = [model.logits(model.shifted(codes[:, :5]), 0, caches)]
        for i in range(5, 12):
            parts.append(model.logits(model.code_inputs(codes[:, i - 1 : i]), i, caches))
    cached = torch.cat(parts, 1)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()


@pytest.mark.parametrize("prefix_len", [0, 4])
def test_cached_sampling_equals_recomputation(prefix_len):
    """The same generator gives the same codes with the KV cache and with the whole sequence run
    again at every step; given codes come back unchanged."""
    model = tiny_model()
    prefix = torch.randint(7, (4, prefix_len)) if prefix_len else None
    a = tg.sample(model, 4, prefix, 1.0, 0, torch.Generator().manual_seed(5), cache=True)
    b = tg.sample(model, 4, prefix, 1.0, 0, torch.Generator().manual_seed(5), cache=False)
    assert torch.equal(a, b) and a.shape == (4, 12)
    if prefix_len:
        assert torch.equal(a[:, :prefix_len], prefix)


def test_conditional_sampling_keeps_the_given_codes_and_uses_them():
    """The continuation follows the codes given: two prefixes, one generator seed, different
    continuations; the prefixes are kept exactly."""
    model = tiny_model()
    p1 = torch.zeros(6, 6, dtype=torch.long)
    p2 = torch.full((6, 6), 5)
    a = tg.sample(model, 6, p1, gen=torch.Generator().manual_seed(0))
    b = tg.sample(model, 6, p2, gen=torch.Generator().manual_seed(0))
    assert torch.equal(a[:, :6], p1) and torch.equal(b[:, :6], p2)
    assert not torch.equal(a[:, 6:], b[:, 6:])


def test_loss_is_the_cross_entropy_of_every_code():
    """gpt_loss = mean over all codes of -log softmax(logits at n)[code n], written out in
    float64; reduction 'none' gives the per-code terms."""
    model = tiny_model()
    codes = torch.randint(7, (2, 12), generator=torch.Generator().manual_seed(6))
    loss, logits = tg.gpt_loss(model, codes)
    logp = torch.log_softmax(logits.double(), -1)
    terms = [-logp[b, n, codes[b, n]] for b in range(2) for n in range(12)]
    assert loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)
    per = tg.gpt_loss(model, codes, reduction="none")[0]
    assert torch.allclose(per.double(), torch.stack(terms), atol=1e-6)


def test_fresh_prior_is_uniform_and_codebook_frozen():
    """The zero-initialised head makes every code equally likely: loss ln K, log2 K bits per
    code; the codebook is a buffer, not a parameter."""
    torch.manual_seed(0)
    model = tg.VideoGPT(torch.randn(7, 3), (2, 2, 3), 12, 2, 1)
    codes = torch.randint(7, (2, 12))
    assert tg.gpt_loss(model, codes)[0].item() == pytest.approx(math.log(7), rel=1e-6)
    nll = tg.sequence_nll(model, codes).sum(1)
    assert tg.bits(nll, 12, 100)["bits_per_token"] == pytest.approx(math.log2(7), rel=1e-6)
    assert "codebook" not in dict(model.named_parameters()) and "codebook" in model.state_dict()


def test_bits_and_nll_by_hand():
    """sequence_nll is the NLL of each code of each grid (nats); bits per token = mean NLL of a grid
    / (ln 2 N), bits per dim = mean NLL of a grid / (ln 2 T C H W)."""
    model = tiny_model()
    codes = torch.randint(7, (3, 12), generator=torch.Generator().manual_seed(7))
    nll = tg.sequence_nll(model, codes, batch=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(codes).double(), -1)
    want = [[-logp[b, n, codes[b, n]] for n in range(12)] for b in range(3)]
    assert torch.allclose(nll, torch.tensor(want, dtype=torch.float64), atol=1e-6)
    b = tg.bits(torch.tensor([2.0, 4.0], dtype=torch.float64), 12, 300)
    assert b["bits_per_token"] == pytest.approx(3 / math.log(2) / 12)
    assert b["bits_per_dim"] == pytest.approx(3 / math.log(2) / 300)


def test_bits_by_latent_frame_by_hand():
    """likelihood's bits per code of each latent frame: the mean -log2 p of the codes of that frame
    (grid (2, 2, 3): codes 0-5 are frame 0, 6-11 frame 1), over every grid."""
    model = tiny_model()
    codes = torch.randint(7, (3, 12), generator=torch.Generator().manual_seed(8))
    ours, _ = tg.likelihood(model, codes, torch.ones(7), 100, nullcontext())
    with torch.no_grad():
        logp = torch.log_softmax(model(codes).double(), -1) / math.log(2)
    want = [
        -sum(logp[b, n, codes[b, n]] for b in range(3) for n in range(6 * t, 6 * t + 6)) / 18
        for t in range(2)
    ]
    assert ours["bits_per_token_by_latent_frame"] == pytest.approx([float(w) for w in want])
    assert sum(want) / 2 == pytest.approx(ours["bits_per_token"])


def test_unigram_baseline_with_add_one_smoothing():
    """p_k = (count_k + 1) / (total + K); a grid's NLL is the sum of -ln p over its codes."""
    counts = torch.tensor([3.0, 0.0, 1.0])  # total 4, K 3: p = [4/7, 1/7, 2/7]
    codes = torch.tensor([[0, 1], [2, 2]])
    nll = tg.unigram_nll(counts, codes)
    want = [-math.log(4 / 7) - math.log(1 / 7), -2 * math.log(2 / 7)]
    assert nll.tolist() == pytest.approx(want)


def test_unigram_counts_sum_over_ranks(monkeypatch):
    """Under DDP the code counts of every rank are added (all_reduce stubbed: a second rank holding
    the same grids), so the unigram baseline sees all training codes."""
    codes = torch.tensor([[0, 2, 2], [1, 2, 0]])
    rt = tg.Runtime(torch.device("cpu"), "float32", None, False, 0, 1, False, True)
    assert tg.unigram_counts(codes, 4, rt).tolist() == [2, 1, 3, 0]
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t: t.mul_(2))
    rt.ddp = True
    assert tg.unigram_counts(codes, 4, rt).tolist() == [4, 2, 6, 0]


def test_draw_follows_temperature_and_top_k():
    """Frequencies of 40000 draws match softmax(logits / T) (restricted to the top k and
    renormalised), for T = 0.5 and 2."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, -1)
    for temperature, top_k in ((0.5, 0), (2.0, 0), (2.0, 2)):
        gen = torch.Generator().manual_seed(0)
        got = torch.bincount(tg.draw(logits, temperature, top_k, gen), minlength=4) / 40000
        p = torch.softmax(logits[0] / temperature, 0)
        if top_k:
            p = torch.cat([p[:top_k], torch.zeros(4 - top_k)])
            p = p / p.sum()
        assert torch.allclose(got, p, atol=0.01), (temperature, top_k, got, p)


def test_codes_of_is_the_first_stages_nearest_code(first_stage, first_stage_model):
    """codes_of (nearest code of the exported encoder's z_e) equals the VQ-VAE's own quantize,
    flattened over (t, h, w) in raster order; decode_codes is its decoder at those codes."""
    vq = first_stage_model[0]
    args = tyro.cli(tg.Args, args=[*TINY, "--vqvae", str(first_stage)])
    fs, meta, _ = tg.load_first_stage(str(first_stage), args)
    x = torch.rand(3, 4, 3, 16, 16)
    with torch.no_grad():
        idx = vq(x)[3]
    assert torch.equal(tg.codes_of(fs[0](x), fs[2]), idx.flatten(1))
    assert tg.encode_codes(fs, (x * 255).round().byte()).shape == (3, 8)
    z = vq.codebook[idx].movedim(-1, 1)
    clips = tg.decode_codes(fs, idx.flatten(1), meta["latent_shape"][1:])
    assert torch.allclose(clips, vq.decode_latents(z).clamp(0, 1).detach(), atol=1e-5)


def test_context_codes_depend_on_the_context_alone(first_stage):
    """The codes kept for conditioning are those of the observed frames: the first latent frames of
    the whole clip, whatever follows them."""
    args = tyro.cli(tg.Args, args=[*TINY, "--vqvae", str(first_stage)])
    fs, _, _ = tg.load_first_stage(str(first_stage), args)
    clips = (torch.rand(2, 4, 3, 16, 16) * 255).byte()
    other = clips.clone()
    other[:, 2:] = 255 - other[:, 2:]
    z, z_other = (fs[0](c.float() / 255) for c in (clips, other))
    assert torch.equal(z[:, :, 0], z_other[:, :, 0]) and not torch.allclose(
        z[:, :, 1], z_other[:, :, 1]
    )
    full = tg.encode_codes(fs, clips)
    assert torch.equal(tg.context_codes(fs, clips[:, :2], 4, 4), full[:, :4])
    assert torch.equal(tg.context_codes(fs, other[:, :2], 4, 4), full[:, :4])
    assert tg.prefix_len(args, [2, 2, 2]) == 4


def test_quick_gelu_by_hand():
    x = torch.tensor([-1.0, 0.0, 2.0])
    want = torch.tensor([-1 / (1 + math.exp(1.702)), 0.0, 2 / (1 + math.exp(-3.404))])
    assert torch.allclose(tg.QuickGELU()(x), want, atol=1e-6)


# ----------------------------------------------------------------------------- CLI and outputs
def test_help_shows_field_docs():
    r = subprocess.run(
        [sys.executable, "train_videogpt.py", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for text in ("--temperature", "--top-k", "--vqvae", "--context", "--eval-only", "bfloat16"):
        assert text in r.stdout, text


def test_tiny_run_writes_outputs(tiny):
    ck = load(tiny / "ckpt.pt")
    assert ck["script"] == "train_videogpt.py" and ck["step"] == 4 and ck["arch"]["width"] == 12
    assert {"model", "optimizer", "scaler", "rng", "arch", "unigram"} <= ck.keys()
    assert ck["arch"]["grid"] == [2, 2, 2] and len(ck["arch"]["first_stage"]) == 12
    assert ck["unigram"].sum() == 6 * 8  # every code of the 6 training grids counted once
    assert "_orig_mod" not in "".join(ck["model"])
    assert list(tiny.glob("events.out.tfevents.*"))
    m = json.loads((tiny / "metrics.json").read_text())
    assert m["script"] == "train_videogpt.py" and m["step"] == 4
    ev, base = m["eval"], m["baselines"]
    assert (
        ev["likelihood"].keys() - {"bits_per_token_by_latent_frame"}
        == base["likelihood"]["unigram"].keys()
    )
    assert len(ev["likelihood"]["bits_per_token_by_latent_frame"]) == 2  # grid (2, 2, 2)
    assert base["likelihood"]["uniform"]["bits_per_token"] == pytest.approx(3.0)  # log2 8
    assert base["likelihood"]["uniform"]["bits_per_dim"] == pytest.approx(3.0 * 8 / (4 * 3 * 256))
    pred, base_pred = ev["prediction"], base["prediction"]
    copy, auto, black = (base_pred[k] for k in ("copy_last", "first_stage", "black"))
    assert pred.keys() == copy.keys() == auto.keys() == black.keys()
    assert {"psnr", "mse_frame_sum"} <= pred.keys()
    assert black["mse_frame_sum"] > 0 and black["mse"] == pytest.approx(
        black["mse_frame_sum"] / 768
    )
    assert len(pred["psnr_per_frame"]) == 2 and len(copy["mse_per_frame"]) == 2
    assert "fd_probe" in ev["unconditional"]
    assert {"real", "black", "frozen", "shuffled", "noise", "first_stage"} == set(
        base["unconditional"]
    )
    perf = m["perf"]
    assert perf["kv_cache_speedup"] > 0 and perf["sample_tokens_per_s_cached"] > 0
    assert m["data"]["split"] == "test" and m["data"]["n_eval"] == 3
    for f in (
        "samples/unconditional_000002.gif",
        "samples/conditional_000004.gif",
        "samples/unconditional_latest.png",
        "samples/conditional_latest.png",
        "plots/horizon.png",
        "plots/training_curves.png",
    ):
        assert (tiny / f).stat().st_size > 0, f


def test_same_seed_interrupted_and_resumed_equals_straight_run(
    tiny, first_stage, tmp_path, monkeypatch, capsys
):
    """A second run with the same seed, stopped by Ctrl-C in step 3 and resumed, ends bit-identical
    to the straight run: weights, optimiser, every RNG and the evaluation (the samples drawn during
    training never touch the training's random streams)."""
    lr_at = tg.lr_at

    def ctrl_c_in_step_3(step, *schedule):  # Ctrl-C arrives in the middle of the third step
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *schedule)

    monkeypatch.setattr(tg, "lr_at", ctrl_c_in_step_3)
    with pytest.raises(SystemExit, match="interrupted after step 3"):
        run(tmp_path, first_stage, "--sample-every", "100")
    assert load(tmp_path / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(tg, "lr_at", lr_at)
    run(tmp_path, first_stage, "--sample-every", "100")
    a, b = load(tiny / "ckpt.pt"), load(tmp_path / "ckpt.pt")
    assert b["step"] == 4 and same_state(a["model"], b["model"])
    assert torch.equal(a["rng"]["data"][0], b["rng"]["data"][0])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # dropout's stream too
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tiny, tmp_path))
    assert ma["eval"] == mb["eval"] and ma["baselines"] == mb["baselines"]
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("held out: ") and "(copy_last " in last and "KV cache x" in last


def test_eval_only_reproduces_eval(tiny, first_stage, tmp_path, capsys):
    before = digest(tiny / "ckpt.pt")
    run(tmp_path, first_stage, "--eval-only", "--ckpt", str(tiny / "ckpt.pt"))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("held out: ") and f"in {tmp_path}: metrics.json" in last
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tiny, tmp_path))
    assert b["eval"] == a["eval"] and b["baselines"] == a["baselines"] and b["step"] == 4
    assert b["perf"]["train_samples_per_s"] is None
    assert digest(tiny / "ckpt.pt") == before and not (tmp_path / "ckpt.pt").exists()
    assert (tmp_path / "samples" / "unconditional_000004.gif").exists()


@pytest.mark.slow  # two fresh processes that each load the first stage: ~15 s
def test_torchrun_two_cpu_processes(first_stage, tmp_path):
    args = [
        "train_videogpt.py",
        *TINY,
        "--vqvae",
        str(first_stage),
        "--out-dir",
        str(tmp_path / "run"),
        "--eval-every",
        "100",
        "--sample-every",
        "100",
    ]
    r = torchrun(args, ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / "run" / "ckpt.pt")
    assert ck["step"] == 4 and len(ck["rng"]["data"]) == 2
    assert not torch.equal(ck["rng"]["data"][0], ck["rng"]["data"][1])  # ranks draw different clips
    assert ck["unigram"].sum() == 6 * 8  # the counts of both ranks' clips
    assert "world 2" in r.stdout and "3 training clips/rank" in r.stdout


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "nonsense"], "error: unknown data kind 'nonsense'"),
        (["--width", "16"], "error: --width 16 must be divisible by 3"),
        (["--heads", "5"], "error: --width 12 must be divisible by 3 .* and by --heads 5"),
        (["--temperature", "0"], "error: need --temperature > 0"),
        (["--context", "3"], "error: --context 3 must be a multiple of the first stage's temporal"),
        (["--resolution", "24"], "error: the first stage in .* at 16 px with 4 frames, not"),
        (["--frames", "8"], "with 4 frames, not --data bouncing_balls at 16 px with 8 frames"),
        (["--data", "smoke"], "trained on --data bouncing_balls .*; pass those flags or make one"),
        (["--ckpt", "/nonexistent/ckpt.pt"], "error: --ckpt /nonexistent/ckpt.pt does not exist"),
        (["--eval-only"], "error: --eval-only needs a checkpoint"),
        (["--data", "folder"], "error: --data folder needs --data-dir"),
        (["--eval-every", "0"], "error: --eval-every 0 must be at least 1"),
    ],
)
def test_bad_input_one_line(tmp_path, first_stage, extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, first_stage, *extra)
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()


def test_wrong_first_stages(tmp_path, first_stage):
    """No first stage, one of another script, a per-frame (2D) one: one line each, with the
    train_vqvae.py command that makes the right one."""
    with pytest.raises(SystemExit, match="error: no readable first stage in .*make one with `py"):
        run(tmp_path, first_stage, "--vqvae", str(tmp_path / "none"))
    meta = json.loads((first_stage / "first_stage.json").read_text())
    for name, changed, message in (
        ("other", {**meta, "script": "train_river.py"}, "was not written by train_vqvae.py"),
        ("flat", {k: v for k, v in meta.items() if k != "temporal_downsample"}, "per-frame \\(2D"),
    ):
        d = tmp_path / name
        shutil.copytree(first_stage, d)
        (d / "first_stage.json").write_text(json.dumps(changed))
        with pytest.raises(SystemExit, match=message) as e:
            run(tmp_path / "out", first_stage, "--vqvae", str(d))
        assert "--temporal-downsample 2" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_script(tmp_path, first_stage):
    torch.save({"script": "train_river.py", "step": 3, "model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="error: .*written by train_river.py, not train_videogpt"):
        run(tmp_path, first_stage)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: cannot read checkpoint"):
        run(tmp_path, first_stage, "--eval-only", "--ckpt", str(tmp_path / "bad.pt"))


def test_failing_runs_keep_good_checkpoint(tiny, first_stage, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(tiny, d)
    good = digest(d / "ckpt.pt")
    with pytest.raises(SystemExit, match="error: .*another architecture: width=12 \\(now 24\\)"):
        run(d, first_stage, "--width", "24")
    with pytest.raises(SystemExit, match="trained with --steps 4 --lr 0.002, not --steps 12"):
        run(d, first_stage, "--steps", "12", "--lr", "1e30")
    with pytest.raises(SystemExit, match="error: non-finite loss"):
        run(
            d,
            first_stage,
            "--accept-changed-args",
            "--steps",
            "12",
            "--lr",
            "1e30",
            "--ckpt-every",
            "100",
            "--eval-every",
            "100",
            "--sample-every",
            "100",
        )
    assert digest(d / "ckpt.pt") == good
