"""train_vqvae.py: CLI, outputs, quantiser invariants, export, determinism, resume, DDP, bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tyro

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
    assert m["perf"]["train_samples_per_s"] > 0 and m["perf"]["mfu"] is None  # no peak known on CPU
    assert m["data"] == {"kind": "smoke", "resolution": 32, "n_eval": 8}
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
    assert meta["latent_std"] == m["eval"]["latent_std"]


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


def test_torchrun_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
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
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
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
