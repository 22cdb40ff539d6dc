"""train_vqvae.py: CLI, outputs, quantiser invariants, export, determinism, resume, DDP, bad input."""

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import tyro
from conftest import assert_flop_rate, torchrun

import toy_data
import train_vqvae as tv

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: more threads only contend on a busy CPU

TINY = (
    "--steps 4 --log-every 1 --eval-every 2 --sample-every 2 --ckpt-every 2 --resolution 32 "
    "--frames 4 --train-clips 4 --eval-clips 2 --width 8 --codebook-size 16 --batch-size 8 "
    "--dtype float32 --no-compile --device cpu --warmup-steps 1 --lr 3e-3"
).split()


def run(out_dir, *extra):
    tv.main(tyro.cli(tv.Args, args=[*TINY, "--out-dir", str(out_dir), *extra]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("tiny")
    run(out)
    return out


# ----------------------------------------------------------------------------- CLI and outputs
def test_help_shows_field_docs():
    r = subprocess.run(
        [sys.executable, "train_vqvae.py", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for text in (
        "--codebook-size",
        "--compile, --no-compile",
        "--resume, --no-resume",
        "--eval-only",
        "commitment weight",
        "bfloat16",
    ):
        assert text in r.stdout


def test_tiny_run_writes_outputs(tiny):
    ck = load(tiny / "ckpt.pt")
    assert ck["script"] == "train_vqvae.py" and ck["step"] == 4 and ck["args"]["width"] == 8
    assert {"model", "optimizer", "scaler", "rng", "arch"} <= ck.keys()
    assert {"python", "numpy", "torch", "data"} <= ck["rng"].keys() and len(ck["rng"]["data"]) == 1
    assert "_orig_mod" not in "".join(ck["model"])
    assert list(tiny.glob("events.out.tfevents.*"))
    m = json.loads((tiny / "metrics.json").read_text())
    assert m["script"] == "train_vqvae.py" and m["step"] == 4
    assert {"psnr", "ssim", "codebook_usage", "perplexity", "latent_mean", "latent_std"} <= m[
        "eval"
    ].keys()
    assert 0 < m["eval"]["codebook_usage"] <= 1 and 1 <= m["eval"]["perplexity"] <= 16
    assert len(m["eval"]["latent_std"]) == 4 and m["eval"]["psnr"] > 0
    assert m["perf"]["train_samples_per_s"] > 0
    assert_flop_rate(m["perf"])
    assert m["data"] == {"kind": "smoke", "resolution": 32, "split": "test", "n_eval": 8}
    assert json.loads((tiny / "args.json").read_text())["codebook_size"] == 16
    assert (tiny / "samples" / "recon_000002.gif").stat().st_size > 0
    assert (tiny / "samples" / "recon_latest.png").exists() and (
        tiny / "samples" / "latent_latest.png"
    ).exists()
    assert (tiny / "plots" / "training_curves.png").exists()
    meta = json.loads((tiny / "first_stage.json").read_text())
    assert (
        meta["latent_shape"] == [4, 4, 4]
        and meta["codebook_size"] == 16
        and meta["data"] == "smoke"
    )
    assert meta["latent_std"] != m["eval"]["latent_std"]  # those are of the test clips
    # the resize baseline needs no model: its figure pins the clips it comes from (test, not val)
    for split, same in (("test", True), ("val", False)):
        ds = toy_data.make_dataset("smoke", 2, 32, 4, seed=0, split=split)
        frames = torch.cat([(ds[i]["video"] * 255).round() / 255 for i in range(2)])
        small = F.interpolate(F.avg_pool2d(frames, 8), scale_factor=8.0, mode="bilinear")
        err = float(((small.clamp(0, 1) - frames) ** 2).mean())
        base = m["baselines"]["resize_to_latent_grid"]["mse"]
        assert (base == pytest.approx(err, rel=1e-5)) == same, split


def test_exported_latent_statistics_come_from_training_clips(tiny):
    """RIVER normalises latents with first_stage.json's mean and std: they are z_e's per-channel
    statistics over the first --eval-clips training clips, never over held-out clips."""
    ck = load(tiny / "ckpt.pt")
    model = tv.VQVAE(**ck["arch"])
    model.load_state_dict(ck["model"])
    model.eval()
    ds = toy_data.make_dataset("smoke", 2, 32, 4, seed=0, split="train")
    frames = torch.cat([ds[i]["video"] for i in range(2)])
    frames = (frames * 255).round() / 255  # clips are held as uint8
    with torch.no_grad():
        z = model.encode(frames).double()  # (8, 4, 4, 4)
    meta = json.loads((tiny / "first_stage.json").read_text())
    n = z.shape[0] * 16
    for c in range(4):
        zc = z[:, c].flatten()
        mean = float(zc.sum() / n)
        std = float(((zc - mean) ** 2).sum() / (n - 1)) ** 0.5
        assert meta["latent_mean"][c] == pytest.approx(mean, abs=1e-5)
        assert meta["latent_std"][c] == pytest.approx(std, rel=1e-4)


# ----------------------------------------------------------------------------- quantiser and model
def test_resize_baseline_scores_the_blurred_frames(tiny):
    """The baseline: frames averaged over 8x8 cells and enlarged back, scored on the same frames."""
    flat = torch.full((2, 3, 3, 16, 16), 100, dtype=torch.uint8)  # one colour: nothing to lose
    assert tv.resize_baseline(flat)["mse"] < 1e-12
    stripes = torch.zeros(1, 1, 1, 16, 16, dtype=torch.uint8)
    stripes[..., ::2] = 255  # every other column: the 8x8 means are all 0.5
    assert tv.resize_baseline(stripes)["mse"] == pytest.approx(0.25)
    m = json.loads((tiny / "metrics.json").read_text())
    assert m["baselines"]["resize_to_latent_grid"].keys() == {"psnr", "ssim", "mse"}


def test_fp16_run_with_the_loss_scaler(tmp_path):
    """--dtype float16: fp16 autocast with the gradient scaler, on the CPU; the scaler's state
    is in the checkpoint and the weights stay finite."""
    run(tmp_path, "--dtype", "float16", "--no-export", "--eval-every", "9", "--sample-every", "9")
    ck = load(tmp_path / "ckpt.pt")
    assert ck["scaler"]["scale"] > 0 and ck["args"]["dtype"] == "float16"
    assert all(v.isfinite().all() for v in ck["model"].values() if v.is_floating_point())


def test_latent_shape_and_decode_range():
    model = tv.VQVAE(3, 8, 4, 32).eval()
    x = torch.rand(2, 3, 64, 64)
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 8)
    zq, idx = model.quantize(z)
    assert zq.shape == z.shape and idx.shape == (2, 8, 8)
    y = model.decode(z)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert tv.VQVAE(1, 8, 4, 32).encode(torch.rand(1, 1, 32, 32)).shape == (1, 4, 4, 4)


def test_quantize_picks_nearest_code():
    model = tv.VQVAE(3, 8, 2, 3)
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]))
    z = torch.tensor([[0.9, 0.8], [-1.2, 0.1], [0.1, -0.2]]).t().reshape(1, 2, 1, 3)
    zq, idx = model.quantize(z)
    assert idx.flatten().tolist() == [1, 2, 0]
    assert torch.equal(zq[0, :, 0].t(), model.codebook[[1, 2, 0]])


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = tv.VQVAE(3, 8, 4, 16)
    x = torch.rand(2, 3, 32, 32)
    tv.init_codebook(model, model.encode(x))  # codes from encoder outputs
    x_rec, z, zq, idx = model(x)
    assert torch.allclose(x_rec, model.decode_latents(zq), atol=1e-5)  # the decoder sees the codes
    x_rec.square().mean().backward()  # no commitment term: only the straight-through path
    g = model.encoder[0].weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.codebook.grad is None and not model.codebook.requires_grad


def test_ema_update_hand_made_case():
    count, total = torch.tensor([1.0, 3.0]), torch.tensor([[2.0], [3.0]])
    counts, sums = torch.tensor([3.0, 0.0]), torch.tensor([[6.0], [0.0]])
    n, m, book = tv.ema_update(count, total, counts, sums, decay=0.5, eps=0.0)
    assert torch.allclose(n, torch.tensor([2.0, 1.5])) and torch.allclose(
        m, torch.tensor([[4.0], [1.5]])
    )
    assert torch.allclose(book, torch.tensor([[2.0], [1.0]]))
    # Laplace smoothing: N_k <- (N_k + eps) / (sum N + K eps) * sum N = [35/18, 14/9] for eps 0.5
    _, _, book = tv.ema_update(count, total, counts, sums, decay=0.5, eps=0.5)
    assert torch.allclose(book, torch.tensor([[72 / 35], [27 / 28]]))


def test_update_codebook_moves_used_code_to_ema_mean():
    model = tv.VQVAE(3, 8, 1, 2)
    model.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    model.ema_count.copy_(torch.tensor([1.0, 1.0]))
    model.ema_sum.copy_(torch.tensor([[0.0], [10.0]]))
    z = torch.tensor([1.0, 2.0, 12.0, 9.0]).view(1, 1, 2, 2)
    idx = model.quantize(z)[1]
    tv.update_codebook(model, z, idx, decay=0.5, eps=0.0, dead_frac=0.0)
    # counts [2, 2], sums [3, 21] -> N [1.5, 1.5], m [1.5, 15.5]
    assert torch.allclose(model.codebook, torch.tensor([[1.0], [31 / 3]]))


def test_dead_codes_restart_at_encoder_outputs():
    torch.manual_seed(0)
    model = tv.VQVAE(3, 8, 2, 4)
    model.codebook.copy_(
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    )  # code 3: never nearest
    model.ema_count.copy_(torch.tensor([10.0, 10.0, 10.0, 1e-3]))
    model.ema_sum.copy_(model.codebook * model.ema_count[:, None])
    z = torch.rand(2, 2, 4, 4)
    idx = model.quantize(z)[1]
    assert (idx != 3).all()
    n_dead = tv.update_codebook(model, z, idx, 0.99, 1e-5, dead_frac=0.03)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert n_dead == 1
    assert (flat - model.codebook[3]).norm(dim=1).min() < 1e-6  # now sits on an encoder output
    assert model.ema_count[3] > 0.03 * model.ema_count.mean()  # with a grace period
    assert torch.allclose(
        model.codebook[:3], torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), atol=0.1
    )


def test_adaptive_gan_weight_balances_gradients():
    x = torch.tensor([3.0, 4.0], requires_grad=True)
    w = tv.adaptive_gan_weight((x**2).sum(), 2 * x.sum(), x)  # gradients (6, 8) and (2, 2)
    assert w.item() == pytest.approx(10 / (8**0.5 + 1e-4))


# ----------------------------------------------------------------------------- export
def test_export_round_trip_in_fresh_process(tiny, tmp_path):
    ck = load(tiny / "ckpt.pt")
    model = tv.VQVAE(**ck["arch"])
    model.load_state_dict(ck["model"])
    model.eval()
    x = torch.rand(
        3, 3, 32, 32
    )  # batch 3: the export example had 2, so the batch dim must be dynamic
    with torch.no_grad():
        z = model.encode(x)
        ref = {"x": x, "z": z, "y": model.decode(z), "y_noisy": model.decode(z + 0.1)}
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import json, sys, torch\n"
        f"d = {str(tiny)!r}\n"
        "enc = torch.export.load(d + '/first_stage_encode.pt2').module()\n"
        "dec = torch.export.load(d + '/first_stage_decode.pt2').module()\n"
        "meta = json.load(open(d + '/first_stage.json'))\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)\n"
        "z = enc(ref['x'])\n"
        "assert 'train_vqvae' not in sys.modules\n"
        "assert list(z.shape[1:]) == meta['latent_shape'], z.shape\n"
        "print((z - ref['z']).abs().max().item(), (dec(ref['z']) - ref['y']).abs().max().item(),"
        " (dec(ref['z'] + 0.1) - ref['y_noisy']).abs().max().item())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert max(map(float, r.stdout.split())) < 1e-5


# ----------------------------------------------------------------------------- determinism, resume, eval-only
def test_same_seed_same_run(tiny, tmp_path):
    run(tmp_path, "--no-export")
    a, b = load(tiny / "ckpt.pt"), load(tmp_path / "ckpt.pt")
    assert same_state(a["model"], b["model"])
    ma, mb = (json.loads((d / "metrics.json").read_text())["eval"] for d in (tiny, tmp_path))
    assert ma["psnr"] == mb["psnr"] and ma["perplexity"] == mb["perplexity"]


def test_ctrl_c_saves_and_resume_equals_straight_run(tiny, tmp_path, monkeypatch):
    lr_at = tv.lr_at

    def ctrl_c_in_step_3(step, *rest):  # Ctrl-C arrives in the middle of the third step
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *rest)

    monkeypatch.setattr(tv, "lr_at", ctrl_c_in_step_3)
    with pytest.raises(SystemExit, match="interrupted after step 3"):
        run(tmp_path, "--no-export")
    assert load(tmp_path / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(tv, "lr_at", lr_at)
    run(tmp_path, "--no-export")
    a, b = load(tiny / "ckpt.pt"), load(tmp_path / "ckpt.pt")
    assert b["step"] == 4
    assert same_state(a["model"], b["model"])
    assert torch.equal(a["rng"]["data"][0], b["rng"]["data"][0])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_eval_only_reproduces_eval(tiny, tmp_path):
    before = digest(tiny / "ckpt.pt")
    run(tmp_path, "--eval-only", "--ckpt", str(tiny / "ckpt.pt"), "--no-export")
    a = json.loads((tiny / "metrics.json").read_text())["eval"]
    b = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    for k in ("psnr", "ssim", "codebook_usage", "perplexity", "loss"):
        assert b[k] == pytest.approx(a[k], rel=1e-6), k
    assert digest(tiny / "ckpt.pt") == before
    assert (tmp_path / "samples" / "recon_latest.png").exists() and not (
        tmp_path / "ckpt.pt"
    ).exists()
    assert not (tmp_path / "first_stage_decode.pt2").exists()  # --no-export


def test_gan_term_runs(tmp_path, capsys):
    run(
        tmp_path,
        "--steps",
        "2",
        "--gan-weight",
        "0.5",
        "--gan-start",
        "1",
        "--no-export",
        "--eval-every",
        "9",
        "--sample-every",
        "9",
    )
    ck = load(tmp_path / "ckpt.pt")
    assert "disc" in ck and "opt_d" in ck
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step 2/2")]
    assert lines and " gan_g " in lines[0] and " gan_d " in lines[0]


DDP_SCRIPT = """
import copy, sys, torch, torch.distributed as dist, tyro
sys.path.insert(0, {root!r})
import train_vqvae as tv
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
z = torch.randn(4, 2, 3, 3)  # the same global batch on both ranks; each rank sees its half
vq = tv.VQVAE(3, 8, 2, 8)
vq.codebook.copy_(torch.randn(8, 2)); vq.ema_count.fill_(1.0); vq.ema_sum.copy_(vq.codebook)
ref = copy.deepcopy(vq)
tv.update_codebook(ref, z, ref.quantize(z)[1], 0.9, 1e-5, 0.0)  # one process, whole batch
half = z[2 * rank:2 * rank + 2]
tv.update_codebook(vq, half, vq.quantize(half)[1], 0.9, 1e-5, 0.0, ddp=True)
assert torch.allclose(vq.codebook, ref.codebook, atol=1e-6), "EMA statistics not summed over ranks"
torch.manual_seed(rank)  # now different data and RNG per rank, with restarts
zr = torch.randn(2, 2, 3, 3) * 5
n_dead = tv.update_codebook(vq, zr, vq.quantize(zr)[1], 0.9, 1e-5, 0.9, ddp=True)
books = [torch.empty_like(vq.codebook) for _ in range(2)]
dist.all_gather(books, vq.codebook)
assert n_dead > 0 and torch.equal(books[0], books[1]), "codebooks differ across ranks"
tv.main(tyro.cli(tv.Args, args=sys.argv[1:]))
"""


@pytest.mark.slow  # fresh processes: the world model's torchrun test covers the shared DDP code fast
def test_torchrun_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT)))
    args = [
        str(script),
        *TINY,
        "--out-dir",
        str(tmp_path / "run"),
        "--eval-every",
        "100",
        "--sample-every",
        "100",
        "--no-export",
    ]
    r = torchrun(args, ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / "run" / "ckpt.pt")
    assert ck["step"] == 4 and len(ck["rng"]["data"]) == 2
    assert not torch.equal(
        ck["rng"]["data"][0], ck["rng"]["data"][1]
    )  # ranks draw different frames
    assert "world 2" in r.stdout and "8 training frames/rank" in r.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 4


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "nonsense"], "error: unknown data kind"),
        (["--resolution", "36"], "error: --resolution 36"),
        (["--ckpt", "/nonexistent/ckpt.pt"], "error: --ckpt /nonexistent/ckpt.pt does not exist"),
        (["--data", "folder"], "error: .*data_dir"),
        # a --data-dir is never ignored: it implies its kind, or stops
        (["--data-dir", "/nonexistent"], "error: --data-dir /nonexistent does not exist"),
        (["--data", "pendulum", "--data-dir", "/"], "error: --data pendulum is generated"),
    ],
)
def test_bad_input_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, *extra)
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()


def test_eval_only_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="error: --eval-only needs a checkpoint"):
        run(tmp_path, "--eval-only")


def test_checkpoint_of_another_script(tmp_path):
    torch.save({"script": "train_river.py", "step": 3, "model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="error: .*written by train_river.py"):
        run(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: cannot read checkpoint"):
        run(tmp_path, "--eval-only", "--ckpt", str(tmp_path / "bad.pt"))


def test_failing_runs_keep_good_checkpoint(tiny, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(tiny, d)
    good = digest(d / "ckpt.pt")
    with pytest.raises(SystemExit, match="error: .*another architecture: width=8 \\(now 16\\)"):
        run(d, "--width", "16")
    with pytest.raises(SystemExit, match="error: unknown data kind"):
        run(d, "--data", "nonsense")
    with pytest.raises(SystemExit, match="trained with --steps 4 --lr 0.003, not --steps 12"):
        run(d, "--steps", "12", "--lr", "1e30")  # would reshape the schedule: refused
    with pytest.raises(SystemExit, match="error: non-finite loss"):
        run(
            d,
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


# ----------------------------------------------------------------------------- method, pinned
# Every test below checks the method against a computation written out here (hand numbers, plain
# loops), never against the function's own output. tests/mutants/train_vqvae.py lists the breaks
# they catch.
CPU = tv.Runtime(torch.device("cpu"), "float32", nullcontext(), False, 0, 1, False, True)


def brute_nearest(z, codebook):
    """Plain loop: index of the closest code (squared L2) for every cell of z (B, D, h, w)."""
    B, D, h, w = z.shape
    book = codebook.tolist()
    out = torch.empty(B, h, w, dtype=torch.long)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                v = z[b, :, i, j].tolist()
                dist = [sum((v[c] - e[c]) ** 2 for c in range(D)) for e in book]
                out[b, i, j] = dist.index(min(dist))
    return out


def reference_ema(book, count, total, batches, decay, eps):
    """Plain-Python EMA codebook (van den Oord et al. App. A.1, Laplace-smoothed counts), one
    batch after the other, each assigned to the nearest code of the codebook at that time."""
    book, count, total = book.tolist(), count.tolist(), total.tolist()
    K, D = len(book), len(book[0])
    for z in batches:
        n = [0.0] * K
        s = [[0.0] * D for _ in range(K)]
        for cell, k in zip(
            z.permute(0, 2, 3, 1).reshape(-1, D).tolist(),
            brute_nearest(z, torch.tensor(book)).flatten().tolist(),
        ):
            n[k] += 1
            s[k] = [a + b for a, b in zip(s[k], cell)]
        count = [decay * count[k] + (1 - decay) * n[k] for k in range(K)]
        total = [[decay * total[k][d] + (1 - decay) * s[k][d] for d in range(D)] for k in range(K)]
        all_n = sum(count)
        smoothed = [(count[k] + eps) / (all_n + K * eps) * all_n for k in range(K)]
        book = [[total[k][d] / smoothed[k] for d in range(D)] for k in range(K)]
    return torch.tensor(book), torch.tensor(count), torch.tensor(total)


def test_nearest_code_matches_brute_force_loop():
    """nearest_code = argmin_k ||z - e_k||^2 per cell (layout B, D, h, w; h != w)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 2, 5, generator=g)
    codebook = torch.randn(7, 3, generator=g)
    expected = brute_nearest(z, codebook)
    assert len(set(expected.flatten().tolist())) >= 4  # a case where the choice matters
    got = tv.nearest_code(z, codebook)
    assert torch.equal(got, expected), f"{got.flatten().tolist()} vs {expected.flatten().tolist()}"


def test_decode_snaps_to_nearest_code():
    """decode(z) = decoder(nearest code of z), clamped: RIVER decodes its continuous samples."""
    torch.manual_seed(0)
    model = tv.VQVAE(1, 8, 2, 5, attention=False).eval()
    model.codebook.copy_(torch.randn(5, 2))
    z = torch.randn(2, 2, 2, 3)
    zq = model.codebook[brute_nearest(z, model.codebook)].permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = ((model.decoder(zq) + 1) / 2).clamp(0, 1)
        assert torch.allclose(model.decode(z), expected, atol=1e-6)
        assert not torch.allclose(model.decode(z), ((model.decoder(z) + 1) / 2).clamp(0, 1))


def test_straight_through_gradient_exact():
    """Straight-through estimator: the decoder sees z_q and dL/dz_e = dL/dz_q (the gradient of
    the decoder at the codes, copied unchanged to the encoder output)."""
    torch.manual_seed(0)
    model = tv.VQVAE(1, 8, 2, 6, attention=False)
    model.encoder = torch.nn.Identity()  # z_e = 2x - 1: the test holds the latents
    model.codebook.copy_(torch.randn(6, 2))
    x = torch.rand(2, 2, 2, 3, requires_grad=True)
    w = torch.randn(2, 1, 16, 24)
    x_rec = model(x)[0]
    (x_rec * w).sum().backward()
    zq = model.codebook[brute_nearest(2 * x.detach() - 1, model.codebook)].permute(0, 3, 1, 2)
    zq = zq.clone().requires_grad_(True)
    out = (model.decoder(zq) + 1) / 2
    g_zq = torch.autograd.grad((out * w).sum(), zq)[0]
    assert torch.allclose(x_rec, out, atol=1e-6)
    assert g_zq.abs().min() > 0
    err = ((x.grad - 2 * g_zq).abs().max() / g_zq.abs().max()).item()  # dz_e/dx = 2
    assert err < 1e-5, f"encoder-side gradient off the straight-through one by {err:.3g} (rel.)"


def test_vq_losses_hand_case_and_commitment_gradient():
    """rec = L1 (or MSE) on pixels; commit = beta * mean (z_e - z_q)^2 with gradient
    2 beta (z_e - z_q) / N on z_e only."""
    x = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2)
    x_rec = x + torch.tensor([0.1, -0.3, 0.2, 0.0]).view(1, 1, 2, 2)
    zq = torch.tensor([1.0, 2.0, -1.0, 0.5]).view(1, 2, 1, 2)
    diff = torch.tensor([1.0, -2.0, 0.0, 3.0]).view(1, 2, 1, 2)
    z = (zq + diff).requires_grad_(True)
    rec, commit = tv.vq_losses(x, x_rec, z, zq, beta=0.4, kind="l1")
    assert rec.item() == pytest.approx(0.15) and commit.item() == pytest.approx(0.4 * 14 / 4)
    commit.backward()
    assert torch.allclose(z.grad, 2 * 0.4 * diff / 4)
    rec, commit = tv.vq_losses(x, x_rec, z, zq, beta=2.0, kind="mse")
    assert rec.item() == pytest.approx(0.14 / 4) and commit.item() == pytest.approx(2 * 3.5)


def test_ema_update_asymmetric_decay_hand_case():
    """N <- g N + (1-g) n and m <- g m + (1-g) sum z with g = 0.9 (not 1-g); e = m / N."""
    count, total = torch.tensor([1.0, 3.0]), torch.tensor([[2.0], [3.0]])
    counts, sums = torch.tensor([3.0, 0.0]), torch.tensor([[6.0], [0.0]])
    n, m, book = tv.ema_update(count, total, counts, sums, decay=0.9, eps=0.0)
    assert torch.allclose(n, torch.tensor([1.2, 2.7])), f"N {n.tolist()}, expected [1.2, 2.7]"
    assert torch.allclose(m, torch.tensor([[2.4], [2.7]])), f"m {m.tolist()}, expected [2.4, 2.7]"
    assert torch.allclose(book, torch.tensor([[2.0], [1.0]]))


def test_update_codebook_k_steps_matches_plain_loop():
    """EMA codebook over 3 batches with decay 0.9 and a large Laplace eps equals a plain-Python
    loop (nearest code by brute force, counts and sums per code, smoothed N, e = m / N)."""
    g = torch.Generator().manual_seed(2)
    model = tv.VQVAE(1, 8, 2, 5, attention=False)
    model.codebook.copy_(torch.randn(5, 2, generator=g))
    model.ema_count.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]))
    model.ema_sum.copy_(model.codebook * model.ema_count[:, None])
    batches = [torch.randn(2, 2, 3, 2, generator=g) for _ in range(3)]
    book, count, total = reference_ema(
        model.codebook, model.ema_count, model.ema_sum, batches, 0.9, 0.3
    )
    torch.manual_seed(0)
    for z in batches:
        restarts = tv.update_codebook(model, z, model.quantize(z)[1], 0.9, 0.3, dead_frac=0.0)
        assert restarts == 0
    assert torch.allclose(model.ema_count, count, atol=1e-5), f"N {model.ema_count} vs {count}"
    assert torch.allclose(model.ema_sum, total, atol=1e-5), f"m {model.ema_sum} vs {total}"
    assert torch.allclose(model.codebook, book, atol=1e-5), f"codes {model.codebook} vs {book}"


def test_dead_code_restart_bookkeeping():
    """Only codes with EMA usage < dead_frac * mean restart: the code jumps to one of the batch's
    encoder outputs, its count becomes the mean count and its sum code * count (so e = m / N
    holds); the live codes take their EMA step."""
    model = tv.VQVAE(1, 8, 2, 4, attention=False)
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]))
    model.ema_count.copy_(torch.tensor([4.0, 4.0, 4.0, 0.01]))
    model.ema_sum.copy_(model.codebook * model.ema_count[:, None])
    cells = torch.tensor([[0.1, 0.1], [0.9, 0.1], [0.1, 0.8], [0.2, 0.0]])  # codes 0, 1, 2, 0
    z = cells.t().reshape(1, 2, 2, 2)
    # counts [2, 1, 1, 0]; decay 0.9: N = [3.8, 3.7, 3.7, 0.009], mean 2.80225 -> only code 3
    # is below 0.5 * mean
    torch.manual_seed(0)
    n_dead = tv.update_codebook(model, z, model.quantize(z)[1], 0.9, 0.0, dead_frac=0.5)
    assert n_dead == 1
    mean = (3.8 + 3.7 + 3.7 + 0.009) / 4
    assert torch.allclose(model.ema_count, torch.tensor([3.8, 3.7, 3.7, mean]))
    assert (cells - model.codebook[3]).abs().sum(1).min() < 1e-6  # on an encoder output
    assert torch.allclose(model.ema_sum[3], model.codebook[3] * mean), f"m_3 {model.ema_sum[3]}"
    m = torch.tensor([[0.03, 0.01], [3.6 + 0.09, 0.01], [0.01, 3.6 + 0.08]])
    assert torch.allclose(model.ema_sum[:3], m)
    assert torch.allclose(model.codebook[:3], m / torch.tensor([3.8, 3.7, 3.7])[:, None])


def test_init_codebook_is_a_fixed_point_of_the_ema():
    """init_codebook: codes at encoder outputs with count 1 and sum = code, so a step in which no
    vector is assigned to a code leaves it where it is (e = m / N)."""
    torch.manual_seed(0)
    model = tv.VQVAE(1, 8, 2, 6, attention=False)
    z = torch.randn(2, 2, 3, 3)
    tv.init_codebook(model, z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert all((flat - e).abs().sum(1).min() < 1e-6 for e in model.codebook)
    start = model.codebook.clone()
    far = torch.full((1, 2, 1, 1), 1e3)  # nearest to one code only, the others get nothing
    k = int(brute_nearest(far, start))
    tv.update_codebook(model, far, model.quantize(far)[1], 0.9, 0.0, dead_frac=0.0)
    others = [i for i in range(6) if i != k]
    moved = (model.codebook[others] - start[others]).abs().max()
    assert moved < 1e-5, f"unassigned codes moved by {moved}"
    assert torch.allclose(model.codebook[k], 0.9 * start[k] + 0.1 * far.flatten(), atol=1e-3)


class CodeStub(torch.nn.Module):
    """Stands in for the VQ-VAE in evaluate(): given code indices per frame, z_e - z_q = 1 and
    x_rec = x + 0.1 everywhere."""

    def __init__(self, idx, K, D):
        super().__init__()
        self.register_buffer("codebook", torch.zeros(K, D))
        self.idx = idx
        self.seen = 0

    def forward(self, x):
        idx = self.idx[self.seen : self.seen + len(x)]
        self.seen += len(x)
        zq = torch.zeros(len(x), self.codebook.shape[1], *idx.shape[1:])
        return x + 0.1, zq + 1, zq, idx


def test_evaluate_usage_perplexity_and_loss_hand_case():
    """usage = fraction of codes used at least once; perplexity = exp(entropy of the code
    histogram); eval loss = rec + beta * commitment."""
    # 4 frames x 2x2 cells over 5 codes: histogram [8, 4, 4, 0, 0] -> p [1/2, 1/4, 1/4, 0, 0]
    idx = torch.tensor([0] * 8 + [1] * 4 + [2] * 4).view(4, 2, 2)
    clips = torch.full((1, 4, 1, 16, 16), 100, dtype=torch.uint8)
    args = tv.Args(beta=0.4, recon_loss="l1")
    scores = tv.evaluate(CodeStub(idx, K=5, D=2), clips, args, CPU, batch=3)[0]
    assert scores["codebook_usage"] == pytest.approx(3 / 5)
    assert scores["perplexity"] == pytest.approx(2**1.5)  # exp(1.5 ln 2)
    assert scores["loss"] == pytest.approx(0.1 + 0.4 * 1.0, rel=1e-5)


def tiny_step_setup(gan_weight=0.0):
    torch.manual_seed(0)
    model = tv.VQVAE(1, 8, 2, 8, attention=False)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        tv.init_codebook(model, model.encode(x))
    args = tv.Args(
        beta=0.7,
        recon_loss="mse",
        ema_decay=0.8,
        ema_eps=0.05,
        dead_code_frac=0.0,
        grad_clip=0.0,
        gan_weight=gan_weight,
        gan_start=0,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, x, args, opt


def reference_losses(ref, x, beta):
    """Plain VQ-VAE objective on a copy of the model: decoder at the nearest codes (by brute
    force), gradient copied to z_e by hand, MSE reconstruction, beta * ||z_e - sg[z_q]||^2."""
    z = ref.encode(x)
    zq = ref.codebook[brute_nearest(z.detach(), ref.codebook)].permute(0, 3, 1, 2)
    x_rec = ref.decode_latents(z + (zq - z).detach())
    rec = ((x_rec - x) ** 2).mean()
    commit = beta * ((z - zq) ** 2).mean()
    return x_rec, z, zq, rec, commit


def test_train_step_losses_gradients_and_ema_against_reference():
    """train_step: loss = rec + beta * commit, the gradients of that objective (straight-through)
    reach the weights, and the codebook takes one EMA step (decay, eps of the args) on the
    batch's pre-step z_e."""
    model, x, args, opt = tiny_step_setup()
    ref = copy.deepcopy(model)
    _, z, _, rec, commit = reference_losses(ref, x, args.beta)
    (rec + commit).backward()
    book, count, _ = reference_ema(
        ref.codebook, ref.ema_count, ref.ema_sum, [z.detach()], args.ema_decay, args.ema_eps
    )
    out = tv.train_step(model, model, None, None, opt, None, tv.make_scaler(CPU), x, 0, args, CPU)
    loss_, rec_, commit_, restarts = out.tolist()
    assert rec_ == pytest.approx(rec.item(), rel=1e-5)
    assert commit_ == pytest.approx(commit.item(), rel=1e-5) and commit.item() > 1e-4
    assert loss_ == pytest.approx(rec.item() + commit.item(), rel=1e-5) and restarts == 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
    assert torch.allclose(model.ema_count, count, atol=1e-5), f"N {model.ema_count} vs {count}"
    assert torch.allclose(model.codebook, book, atol=1e-5), f"codes {model.codebook} vs {book}"


def test_train_step_gan_hinge_and_adaptive_weight_against_reference():
    """With the GAN on: g = -mean D(x_rec); d = mean relu(1 - D(x)) + mean relu(1 + D(x_rec));
    loss = rec + commit + gan_weight * (|d rec/d x_rec| / |d g/d x_rec|) * g, with the weights'
    gradients of that loss."""
    model, x, args, opt = tiny_step_setup(gan_weight=0.5)
    torch.manual_seed(1)
    disc = tv.patch_discriminator(1, 8)
    with torch.no_grad():  # logits on both sides of the hinge's kinks at +-1
        disc[-1].weight.mul_(10)
        disc[-1].bias.zero_()
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    ref, ref_d = copy.deepcopy(model), copy.deepcopy(disc)
    x_rec, _, _, rec, commit = reference_losses(ref, x, args.beta)
    real, fake = ref_d(x), ref_d(x_rec)
    g = -fake.mean()
    d = torch.relu(1 - real).mean() + torch.relu(1 + fake.detach()).mean()
    g_rec = torch.autograd.grad(rec, x_rec, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, x_rec, retain_graph=True)[0]
    w = (g_rec.norm() / (g_gan.norm() + 1e-4)).detach()
    assert 1e-4 < w < 1e3 and all(t.any() for t in (real > 1, real < 1, fake > -1, fake < -1))
    loss = rec + commit + 0.5 * w * g
    ref.zero_grad()
    loss.backward()
    out = tv.train_step(model, model, disc, disc, opt, opt_d, tv.make_scaler(CPU), x, 0, args, CPU)
    loss_, rec_, commit_, g_, d_, _ = out.tolist()
    assert g_ == pytest.approx(g.item(), rel=1e-4, abs=1e-6)
    assert d_ == pytest.approx(d.item(), rel=1e-5)
    assert loss_ == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


# ----------------------------------------------------------------------------- spatio-temporal mode
# The 3D VQ-VAE of train_videogpt.py (--temporal-downsample > 1): shapes, the encoder's causality
# in time, its parts against plain loops, a tiny run with its export. Per-frame mode is above.
TINY_3D = [  # 16 px clips of 4 frames -> 2 x 4 x 4 codes
    *TINY,
    *"--temporal-downsample 2 --spatial-downsample 4 --batch-size 2 --resolution 16".split(),
    *"--data bouncing_balls --no-export --eval-every 9 --sample-every 9".split(),
]


@pytest.mark.parametrize(
    "down, strides",
    [
        ((4, 8, 8), [(2, 2, 2), (2, 2, 2), (1, 2, 2)]),
        ((4, 4, 4), [(2, 2, 2), (2, 2, 2)]),
        ((2, 4, 4), [(2, 2, 2), (1, 2, 2)]),
        ((1, 8, 8), [(1, 2, 2)] * 3),
        ((2, 2, 2), [(2, 2, 2)]),
    ],
)
def test_3d_shapes_and_strides(down, strides):
    """max log2 d stride-2 levels, each axis halved while it must still shrink; z_e is
    (B, D, T/dt, H/ds, W/ds), indices long in [0, K), decode gives (B, T, C, H, W)."""
    assert tv.conv_strides(down) == strides
    torch.manual_seed(0)
    model = tv.VQVAE3D(2, 4, 3, 5, True, down[0], down[1], res_blocks=1).eval()
    assert sum(isinstance(m, torch.nn.Conv3d) and 2 in m.stride for m in model.modules()) == len(
        strides
    )
    x = torch.rand(2, 8, 2, 16, 16)
    with torch.no_grad():
        x_rec, z, zq, idx = model(x)
    assert z.shape == zq.shape == (2, 3, 8 // down[0], 16 // down[1], 16 // down[1])
    assert idx.shape == (2, *z.shape[2:]) and idx.dtype == torch.long
    assert 0 <= idx.min() and idx.max() < 5
    assert x_rec.shape == x.shape and model.decode(z).shape == x.shape


def test_3d_encoder_is_causal_in_time():
    """Latent frame k sees input frames < (k + 1) dt only: changing frames from 2 dt on leaves
    latent frames 0 and 1 bit-identical and changes frame 2 (axial attention and convolutions)."""
    torch.manual_seed(0)
    model = tv.VQVAE3D(1, 4, 3, 8, True, 2, 4, res_blocks=2).eval()
    x = torch.rand(1, 8, 1, 8, 8)
    y = x.clone()
    y[:, 4:] = torch.rand(1, 4, 1, 8, 8)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(y)
        short = model.encode(x[:, :4])  # a 4-frame clip: exactly the first two latent frames
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])
    # another clip length may sum in another order: 7e-6 apart on an AMD EPYC, fp32
    assert torch.allclose(short, a[:, :, :2], atol=1e-5)


def test_local_codes_see_their_own_cell_only():
    """--local-codes: z_e of a cell is an MLP of that cell's 2 x 4 x 4 pixels (computed here with
    the cells cut out by reshaping and the layers as matrices); two black cells get the same z_e,
    and changing one cell changes its own z_e alone."""
    torch.manual_seed(0)
    model = tv.VQVAE3D(1, 4, 3, 8, True, 2, 4, local_codes=True).eval()
    x = torch.rand(2, 4, 1, 8, 8)
    x[0, :2, :, :4, :4] = 0  # clip 0, latent cell (0, 0, 0)
    x[1, 2:, :, 4:, 4:] = 0  # clip 1, latent cell (1, 1, 1)
    cells = (x * 2 - 1).view(2, 2, 2, 1, 2, 4, 2, 4)  # B, t, dt, C, h, ds, w, ds
    cells = cells.permute(0, 1, 4, 6, 3, 2, 5, 7).flatten(4)  # B, t, h, w, (C dt ds ds)
    first, _, second, _, out = model.encoder
    h = F.relu(cells @ first.weight.flatten(1).T + first.bias)
    h = F.relu(h @ second.weight.flatten(1).T + second.bias)
    want = (h @ out.weight.flatten(1).T + out.bias).permute(0, 4, 1, 2, 3)
    y = x.clone()
    y[0, 2:, :, :4, 4:] = torch.rand(2, 1, 4, 4)  # clip 0, latent cell (1, 0, 1)
    with torch.no_grad():
        z, z_y = model.encode(x), model.encode(y)
    assert torch.allclose(z, want, atol=1e-5)
    assert torch.equal(z[0, :, 0, 0, 0], z[1, :, 1, 1, 1])
    changed = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    changed[0, 1, 0, 1] = True
    assert torch.equal((z_y != z).any(1), changed)


def test_causal_conv_pads_time_in_front_and_space_around():
    """CausalConv3d = zero padding k - s: all of it in front in time, centred in space (the extra
    pixel in front), then a plain convolution."""
    torch.manual_seed(0)
    conv = tv.CausalConv3d(2, 3, 4, (2, 1, 2))
    x = torch.randn(1, 2, 6, 5, 6)
    padded = torch.zeros(1, 2, 6 + 2, 5 + 3, 6 + 2)
    padded[:, :, 2:, 2:7, 1:7] = x  # t: 2 in front; h: 3 = 2 + 1; w: 2 = 1 + 1
    want = torch.nn.functional.conv3d(padded, conv.conv.weight, conv.conv.bias, (2, 1, 2))
    assert torch.allclose(conv(x), want, atol=1e-6)


def test_frame_norm_normalises_each_frame_alone():
    """FrameNorm: GroupNorm statistics per (clip, frame, group), never across frames."""
    torch.manual_seed(0)
    norm = tv.FrameNorm(2, 4)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4))
        norm.bias.copy_(torch.randn(4))
    x = torch.randn(2, 4, 3, 5, 5) * torch.arange(1, 4).view(1, 1, 3, 1, 1)
    out = norm(x)
    for b in range(2):
        for t in range(3):
            for g in range(2):
                v = x[b, 2 * g : 2 * g + 2, t]
                z = (v - v.mean()) / (v.var(unbiased=False) + norm.eps).sqrt()
                want = z * norm.weight[2 * g : 2 * g + 2, None, None]
                want = want + norm.bias[2 * g : 2 * g + 2, None, None]
                assert torch.allclose(out[b, 2 * g : 2 * g + 2, t], want, atol=1e-5)


def plain_attention(x, qkv, proj, heads, causal):
    """Multi-head self-attention over the rows of x (L, C), written out with a softmax."""
    L, C = x.shape
    q, k, v = qkv(x).chunk(3, -1)
    out = []
    for h in range(heads):
        s = slice(h * C // heads, (h + 1) * C // heads)
        scores = q[:, s] @ k[:, s].t() / math.sqrt(C // heads)
        if causal:
            scores = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
        out.append(scores.softmax(-1) @ v[:, s])
    return proj(torch.cat(out, -1))


def test_axial_attention_is_the_sum_over_time_rows_and_columns():
    """AxialAttention at (t, i, j) = attention along time (causal if asked) + along rows + along
    columns, each with its own projections, computed here line by line."""
    torch.manual_seed(0)
    attn = tv.AxialAttention(4, heads=2, causal=True)
    x = torch.randn(1, 4, 3, 2, 5)
    out = attn(x)
    for t in range(3):
        for i in range(2):
            for j in range(5):
                lines = (x[0, :, :, i, j].t(), x[0, :, t, :, j].t(), x[0, :, t, i, :].t())
                where = (t, i, j)
                want = sum(
                    plain_attention(line, attn.qkv[a], attn.proj[a], 2, a == 0)[where[a]]
                    for a, line in enumerate(lines)
                )
                assert torch.allclose(out[0, :, t, i, j], want, atol=1e-5), (t, i, j)


def test_resize_baseline_3d_hand_case():
    """Each cell averages dt frames of ds x ds pixels: a clip that alternates 0 and 255 every frame
    becomes 0.5 everywhere (MSE 0.25); a constant clip loses nothing."""
    flicker = torch.zeros(1, 4, 1, 16, 16, dtype=torch.uint8)
    flicker[:, ::2] = 255
    assert tv.resize_baseline(flicker, 2, 4)["mse"] == pytest.approx(0.25)
    flat = torch.full((1, 4, 1, 16, 16), 77, dtype=torch.uint8)
    assert tv.resize_baseline(flat, 2, 4)["mse"] < 1e-12


@pytest.mark.parametrize(
    "flags",
    [
        ["--no-attention"],
        ["--no-attention", "--local-codes"],
        pytest.param(["--attention"], marks=pytest.mark.slow),
    ],
)
def test_3d_tiny_run_and_export(tmp_path, flags):
    """--temporal-downsample 2 --spatial-downsample 4: clips of 4 frames of 16 px -> 2 x 4 x 4
    codes, trained on whole clips; then the export: first_stage.json has the grid and the
    codebook, the programs take clips and match the model (exporting axial attention takes
    several seconds: slow). The checkpoint records the encoder: the other one refuses it."""
    run(tmp_path, *TINY_3D[len(TINY) :], *flags)
    ck = load(tmp_path / "ckpt.pt")
    assert ck["arch"]["temporal_downsample"] == 2 and ck["arch"]["spatial_downsample"] == 4
    local = "--local-codes" in flags
    assert ck["arch"]["local_codes"] is local
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["data"]["n_eval"] == 8 and 0 < m["eval"]["codebook_usage"] <= 1
    assert len(m["eval"]["latent_std"]) == 4 and m["baselines"]["resize_to_latent_grid"]["mse"] > 0
    model = tv.build_model(ck["arch"])
    model.load_state_dict(ck["model"])
    model.eval()
    args = tyro.cli(tv.Args, args=[*TINY_3D, *flags])
    stats = {k: m["eval"][k] for k in ("latent_mean", "latent_std")}
    meta = tv.first_stage_meta(args, 3, 4, m["eval"], stats, model.codebook)
    tv.export_first_stage(model, str(tmp_path), meta)
    meta = json.loads((tmp_path / "first_stage.json").read_text())
    assert meta["latent_shape"] == [4, 2, 4, 4] and meta["frames"] == 4
    assert meta["temporal_downsample"] == 2
    assert torch.equal(torch.tensor(meta["codebook"]), model.codebook)
    x = torch.rand(3, 4, 3, 16, 16)
    enc = torch.export.load(str(tmp_path / "first_stage_encode.pt2")).module()
    dec = torch.export.load(str(tmp_path / "first_stage_decode.pt2")).module()
    with torch.no_grad():
        z = model.encode(x)
        assert torch.allclose(enc(x), z, atol=1e-5)
        assert torch.allclose(dec(z), model.decode(z), atol=1e-5)
    other = [f for f in flags if f != "--local-codes"] + ["--local-codes"] * (not local)
    with pytest.raises(SystemExit, match=f"local_codes={local} \\(now {not local}\\)"):
        run(tmp_path, *TINY_3D[len(TINY) :], *other)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temporal-downsample", "3"], "error: --temporal-downsample 3 must be a power of 2"),
        (["--temporal-downsample", "8"], "error: --temporal-downsample 8 .* --frames 4"),
        (["--spatial-downsample", "4"], "error: --spatial-downsample 4 .* and 8 without"),
        (["--temporal-downsample", "2", "--spatial-downsample", "3"], "--spatial-downsample 3"),
        (["--local-codes"], "error: --local-codes is an encoder of the spatio-temporal"),
    ],
)
def test_3d_bad_input_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, *extra)
    assert "\n" not in str(e.value.code) and not (tmp_path / "args.json").exists()
