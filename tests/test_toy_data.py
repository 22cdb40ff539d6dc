"""Tests for toy_data.py: shapes, determinism, prompts, physics invariants, Moving MNIST rules,
loaders, smoke incompressibility, video folders, the factory, clip helpers and the CLI."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

import toy_data as td

SYNTHETIC = (
    "shapes",
    "bouncing_balls",
    "pendulum",
    "falling",
    "projectile",
    "moving_mnist",
    "smoke",
)


def centroid(frame):
    """Intensity-weighted (x, y) in pixel coordinates of a (H, W) frame."""
    h, w = frame.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return (frame * xs).sum() / frame.sum(), (frame * ys).sum() / frame.sum()


# ----------------------------------------------------------------------------- every kind
@pytest.mark.parametrize("kind", SYNTHETIC)
@pytest.mark.parametrize("res,frames", [(64, 16), (24, 5)])
def test_shape_dtype_range(kind, res, frames):
    threads = torch.get_num_threads()
    ds = td.make_dataset(kind, 3, res, frames, seed=1)
    assert len(ds) == 3 and ds.channels == td.channels_of(kind)
    for i in range(3):
        item = ds[i]
        v = item["video"]
        assert v.shape == (frames, td.channels_of(kind), res, res) and v.dtype == torch.float32
        assert v.min() >= 0 and v.max() <= 1 and v.max() > 0.2  # something is drawn
        if "states" in item:
            assert item["states"].shape[0] == frames and item["states"].shape[-1] == 4
    with pytest.raises(IndexError):
        ds[3]
    assert (
        torch.get_num_threads() == threads
    )  # generation runs on one thread, then restores the setting


def test_shapes_non_square_and_single_frame():
    v = td.ToyDataset(2, width=80, height=48, num_frames=1)[1]["video"]
    assert v.shape == (1, 3, 48, 80) and v.max() > 0.5


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_deterministic_per_index_and_splits_differ(kind):
    a, b = td.make_dataset(kind, 4, 32, 4, seed=3), td.make_dataset(kind, 4, 32, 4, seed=3)
    assert torch.equal(a[2]["video"], b[2]["video"]) and torch.equal(a[2]["video"], a[-2]["video"])
    val = td.make_dataset(kind, 4, 32, 4, seed=3, split="val")
    other_seed = td.make_dataset(kind, 4, 32, 4, seed=4)
    assert not torch.equal(a[2]["video"], val[2]["video"])
    assert not torch.equal(a[2]["video"], other_seed[2]["video"])
    assert not torch.equal(a[1]["video"], a[2]["video"])


def test_bad_sizes_and_kinds():
    with pytest.raises(ValueError, match="unknown data kind") as e:
        td.make_dataset("cats", 4)
    assert all(k in str(e.value) for k in td.KINDS)
    with pytest.raises(ValueError, match="resolution"):
        td.make_dataset("shapes", 4, resolution=4)
    with pytest.raises(ValueError, match="num_frames"):
        td.make_dataset("smoke", 4, num_frames=0)
    with pytest.raises(ValueError, match="split"):
        td.make_dataset("shapes", 4, split="dev")
    with pytest.raises(ValueError, match="data_dir"):
        td.make_dataset("folder", 4)
    with pytest.raises(ValueError, match="unknown data kind"):
        td.channels_of("cats")
    assert td.channels_of("moving_mnist") == 1 and td.channels_of("smoke") == 3


# ----------------------------------------------------------------------------- prompted shapes
def test_prompts_parse_back_to_attrs():
    ds = td.ToyDataset(400, 16, 16, 2, seed=5)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        assert td.parse_prompt(item["prompt"]) == item["attrs"]
        assert set(item["attrs"]) == {"type", "shape", "color", "color_to", "motion"}
        seen.add(item["attrs"]["type"])
    assert seen == {"moving", "rotating", "color_transition", "bouncing"}
    assert td.parse_prompt("A red circle moving from left to right") == {
        "type": "moving",
        "shape": "circle",
        "color": "red",
        "color_to": None,
        "motion": "left_to_right",
    }
    assert td.parse_prompt("Color gradient transitioning from blue to red")["color_to"] == "red"
    with pytest.raises(ValueError, match="cannot parse"):
        td.parse_prompt("a cat playing piano")
    with pytest.raises(ValueError, match="color"):
        td.parse_prompt("A mauve circle moving from left to right")


def test_generator_methods_and_bad_attrs():
    g = td.ToyVideoGenerator(32, 32, 6, seed=0)
    for video, prompt in (
        g.generate_moving_shape("triangle", "green", "top_to_bottom"),
        g.generate_rotating_shape("square", "blue", "counter-clockwise"),
        g.generate_color_transition("blue", "red"),
        g.generate_bouncing_ball(),
    ):
        assert video.shape == (6, 3, 32, 32) and video.dtype == torch.float32
        assert td.make_prompt(td.parse_prompt(prompt)) == prompt
    assert g.generate_rotating_shape("square", "blue")[1] == "A blue square rotating clockwise"
    with pytest.raises(ValueError, match="rotating shape"):
        g.generate_rotating_shape("circle", "red")
    with pytest.raises(ValueError, match="direction"):
        g.generate_moving_shape("circle", "red", "sideways")


@pytest.mark.parametrize("shape", td.SHAPES)
def test_moving_shapes_move_as_prompted_and_stay_visible(shape):
    g = td.ToyVideoGenerator(72, 40, 10, seed=2)
    for direction in td.DIRECTIONS:
        video, _ = g.generate_moving_shape(shape, "white", direction)
        m = video[:, 0].numpy()
        (x0, y0), (x1, y1) = centroid(m[0]), centroid(m[-1])
        dx, dy = td.direction_vector(direction)
        for d, delta in ((dx, x1 - x0), (dy, y1 - y0)):
            assert delta > 5 if d > 0 else delta < -5 if d < 0 else abs(delta) < 0.5, (
                direction,
                delta,
            )
        mass = m.sum((1, 2))
        assert mass.min() > 0.97 * mass.max()  # never clipped by the frame border
        assert (
            m[:, 0].max() == 0
            and m[:, -1].max() == 0
            and m[:, :, 0].max() == 0
            and m[:, :, -1].max() == 0
        )


@pytest.mark.parametrize("shape,fold", [("square", 4), ("triangle", 3)])
def test_rotation_direction(shape, fold):
    g = td.ToyVideoGenerator(64, 64, 8, seed=4)
    for direction, sign in (("clockwise", 1), ("counter-clockwise", -1)):
        for _ in range(3):
            m = g.generate_rotating_shape(shape, "red", direction)[0][:, 0].numpy()
            ys, xs = np.mgrid[0:64, 0:64] + 0.5
            z = []
            for f in m:  # k-fold angular moment: its phase / k is the shape's orientation
                cx, cy = centroid(f)
                phase = np.exp(1j * fold * np.arctan2(ys - cy, xs - cx))
                z.append((f * np.hypot(xs - cx, ys - cy) ** fold * phase).sum())
            steps = (
                np.angle(np.array(z[1:]) / np.array(z[:-1])) / fold
            )  # y points down: + is clockwise
            assert np.all(sign * steps > 0.05) and np.all(np.abs(steps) < 0.25), steps


def test_color_transition_goes_from_one_colour_to_the_other():
    video, _ = td.ToyVideoGenerator(32, 32, 9, seed=0).generate_color_transition("blue", "red")
    assert torch.allclose(
        video[0], torch.tensor(td.COLORS["blue"])[:, None, None].expand(3, 32, 32), atol=1e-5
    )
    assert torch.allclose(
        video[-1], torch.tensor(td.COLORS["red"])[:, None, None].expand(3, 32, 32), atol=1e-5
    )
    assert video[4].std(dim=(1, 2)).max() > 0.05  # a spatial gradient in the middle


def test_save_prompts(tmp_path):
    ds = td.ToyDataset(5, 16, 16, 2)
    ds.save_prompts(tmp_path / "p.txt")
    ds.save_prompts(str(tmp_path / "p.json"))
    assert (tmp_path / "p.txt").read_text().splitlines() == [ds[i]["prompt"] for i in range(5)]
    assert '"attrs"' in (tmp_path / "p.json").read_text()


def test_collate_batches_prompted_items():
    loader = torch.utils.data.DataLoader(
        td.ToyDataset(6, 16, 16, 3), batch_size=4, collate_fn=td.collate
    )
    batch = next(iter(loader))
    assert (
        batch["video"].shape == (4, 3, 3, 16, 16)
        and len(batch["prompt"]) == 4
        and len(batch["attrs"]) == 4
    )


# ----------------------------------------------------------------------------- physics
def test_balls_stay_in_box_collide_and_conserve_energy():
    collided = 0
    for seed in range(12):
        s, r = td.simulate_balls(np.random.default_rng(seed), 5, 40)
        assert np.all(s[..., 0] >= r - 1e-6) and np.all(s[..., 0] <= 1 - r + 1e-6)
        assert np.all(s[..., 1] >= r - 1e-6) and np.all(s[..., 1] <= 1 - r + 1e-6)
        ke = (s[..., 2:] ** 2).sum((1, 2))
        assert np.allclose(ke, ke[0], rtol=1e-5)  # elastic walls and ball-ball collisions
        d = np.linalg.norm(s[:, :, None, :2] - s[:, None, :, :2], axis=-1) - (r[:, None] + r[None])
        collided += (d[:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] < 0.01).any()
    assert collided >= 3  # the energy check covered real collisions


def test_ball_states_in_pixels_with_nan_padding():
    ds = td.BouncingBalls(20, resolution=48, num_frames=8)
    counts = set()
    for i in range(20):
        st = ds[i]["states"].numpy()
        present = ~np.isnan(st[0, :, 0])
        counts.add(int(present.sum()))
        assert np.all(np.isnan(st[:, ~present])) and np.all(
            (st[:, present, :2] > 0) & (st[:, present, :2] < 48)
        )
    assert counts - {1, 2, 3, 4, 5} == set() and len(counts) >= 3
    assert td.BouncingBalls(2, num_balls=2)[0]["states"].shape[1] == 2


def test_pendulum_keeps_rod_length_and_swings():
    ds = td.Pendulum(5, resolution=64, num_frames=30)
    for i in range(5):
        st = ds[i]["states"][:, 0].numpy()
        length = np.hypot(st[:, 0] - 0.5 * 64, st[:, 1] - 0.12 * 64)
        assert np.allclose(length, length[0], rtol=1e-4)
        assert np.sign(st[:, 0] - 32).min() < 0 < np.sign(st[:, 0] - 32).max()  # crosses the middle


def test_falling_objects_fall_and_bounce():
    ds, bounced = td.FallingObjects(10, resolution=64, num_frames=30), 0
    for i in range(10):
        st = ds[i]["states"].numpy()
        st = st[:, ~np.isnan(st[0, :, 0])]
        assert np.all(st[..., 1] < 64) and np.all(st[-1, :, 1] > st[0, :, 1])  # ends lower
        bounced += (np.diff(np.sign(st[..., 3]), axis=0) < 0).any()  # vy turned upwards
    assert bounced >= 5


def test_projectile_launch_angle_and_gravity():
    ds = td.Projectile(10, resolution=64, num_frames=8)
    for i in range(10):
        item = ds[i]
        st = item["states"][:, 0].numpy()
        angle = np.degrees(np.arctan2(-st[0, 3], abs(st[0, 2])))
        assert 30 <= angle <= 60
        assert np.allclose(np.diff(st[:3, 3]), 0.005 * 64, atol=1e-4)  # vy grows by g per frame
        assert item["video"][-1].sum() > item["video"][0].sum()  # the trail adds light


# ----------------------------------------------------------------------------- Moving MNIST
def test_mnist_trajectory_follows_clamp_and_flip():
    bounces = 0
    for seed in range(10):
        pos, vel = td.mnist_trajectory(np.random.default_rng(seed), 2, 60, step=0.1)
        assert np.allclose(np.linalg.norm(vel, axis=-1), 0.1)  # constant speed
        assert pos.min() >= 0 and pos.max() <= 1
        for t in range(1, 60):
            moved = pos[t - 1] + vel[t - 1]
            hit = (moved <= 0) | (moved >= 1)
            assert np.allclose(pos[t], np.clip(moved, 0, 1))
            assert np.allclose(vel[t], np.where(hit, -vel[t - 1], vel[t - 1]))
            bounces += hit.sum()
    assert bounces > 10


def test_moving_mnist_states_inside_and_max_compositing():
    ds = td.MovingMNIST(40, sequence_length=20, num_digits=2)
    pool = td.digit_pool("train")
    overlap_checked = False
    for i in range(40):
        item = ds[i]
        st = item["states"].numpy()
        assert np.all(st[..., :2] - 14 >= 0) and np.all(st[..., :2] + 14 <= 64)
        assert np.allclose(np.linalg.norm(st[..., 2:], axis=-1), 0.1 * 36, atol=1e-4)
        rng = ds.rng(i)  # replay the sample's draws to rebuild both digit layers
        pos, _ = td.mnist_trajectory(rng, 2, 20)
        digits = pool[rng.integers(len(pool), size=2)]
        tl = (pos * 36).astype(int)
        layers = np.zeros((2, 20, 64, 64), np.uint8)
        for t in range(20):
            for k in range(2):
                layers[k, t, tl[t, k, 1] : tl[t, k, 1] + 28, tl[t, k, 0] : tl[t, k, 0] + 28] = (
                    digits[k]
                )
        video = (item["video"][:, 0].numpy() * 255).round()
        assert np.array_equal(video, layers.max(0))
        if ((layers[0] > 0) & (layers[1] > 0)).any():
            overlap_checked = True
            assert not np.array_equal(video, np.minimum(layers.sum(0, dtype=int), 255))
    assert overlap_checked


def test_moving_mnist_pools_disjoint_and_resized():
    pools = {s: td.digit_pool(s) for s in td.SPLITS}
    train = pools["train"]
    assert train.shape[1:] == (28, 28) and train.dtype == np.uint8 and len(pools["val"]) > 100
    glyphs = {s: {d.tobytes() for d in pool} for s, pool in pools.items()}
    assert not glyphs["train"] & glyphs["val"] and not glyphs["train"] & glyphs["test"]
    assert not glyphs["val"] & glyphs["test"]
    assert not set(td._TEST_FONTS) - set(td._DIGIT_FONTS)
    rows = np.nonzero(train[:50].max(2))[1]
    assert 14 <= np.ptp(rows) <= 26  # MNIST-like: ~20 px tall in a 28 px box
    v = td.MovingMNIST(2, sequence_length=4, resolution=32, train=False)[0]["video"]
    assert v.shape == (4, 1, 32, 32)
    with pytest.raises(ValueError, match="canvas_size"):
        td.MovingMNIST(2, canvas_size=28)


def test_font_digits_of_each_split_replayed_from_its_typefaces_and_seed():
    """Training digits are drawn from the training typefaces, val and test digits from the held-out
    ones (_TEST_FONTS), each split with its own jitter seed [20150, s]: replayed here."""
    import matplotlib
    from PIL import ImageFont

    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    for split, seed, held_out in (("train", 1, False), ("val", 2, True), ("test", 0, True)):
        names = [f for f in td._DIGIT_FONTS if (f in td._TEST_FONTS) == held_out]
        fonts = [ImageFont.truetype(os.path.join(root, f), 56) for f in names]
        rng = np.random.default_rng([20150, seed])
        want = [td._glyph_digit(rng, td._pick(rng, fonts), str(k % 10)) for k in range(12)]
        assert np.array_equal(td.font_digits(split, num=12), np.stack(want)), split


def test_moving_mnist_val_clips_draw_held_out_digits():
    """A val clip is the max of its two digits, replayed from the val pool (held-out typefaces):
    none of its digit images is a training digit."""
    ds = td.MovingMNIST(6, sequence_length=3, split="val")
    pool, train = td.digit_pool("val"), {d.tobytes() for d in td.digit_pool("train")}
    for i in range(6):
        rng = ds.rng(i)
        pos, _ = td.mnist_trajectory(rng, 2, 3)
        digits = pool[rng.integers(len(pool), size=2)]
        tl = (pos[0] * 36).astype(int)
        frame = np.zeros((64, 64), np.uint8)
        for k in range(2):
            sl = frame[tl[k, 1] : tl[k, 1] + 28, tl[k, 0] : tl[k, 0] + 28]
            np.maximum(sl, digits[k], out=sl)
        assert np.array_equal((ds[i]["video"][0, 0].numpy() * 255).round(), frame)
        assert not {d.tobytes() for d in digits} & train


def _write_idx(path, images, magic=b"\0\0\x08\x03"):
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(magic + struct.pack(">3I", *images.shape) + images.tobytes())


def test_real_mnist_formats_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs[:2])
    assert np.array_equal(td.load_mnist_images(str(tmp_path), train=True), imgs)
    assert np.array_equal(td.load_mnist_images(str(tmp_path), train=False), imgs[:2])
    np.savez(tmp_path / "fashion.npz", x_train=imgs, x_test=imgs[:3].astype(np.float32) / 255)
    assert np.array_equal(
        td.load_mnist_images(str(tmp_path / "fashion.npz"), train=False), imgs[:3]
    )
    flat = np.full((3, 28, 28), 77, np.uint8)
    flat[:, :4] = 0
    _write_idx(tmp_path / "flat.gz", flat)
    (tmp_path / "real").mkdir()
    _write_idx(tmp_path / "real" / "train-images-idx3-ubyte.gz", flat)
    v = td.MovingMNIST(2, sequence_length=5, mnist_path=str(tmp_path / "real"))[0]["video"]
    assert set(np.unique((v.numpy() * 255).round())) == {0, 77}  # digits come from the file
    _write_idx(tmp_path / "bad.gz", imgs)
    with open(tmp_path / "bad.gz", "rb") as f:
        raw = gzip.decompress(f.read())
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        td.load_mnist_images(str(tmp_path / "short.gz"))
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX"):
        td.load_mnist_images(str(tmp_path / "junk.gz"))
    _write_idx(tmp_path / "labels", imgs, magic=b"\0\0\x09\x03")
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        td.load_mnist_images(str(tmp_path / "labels"))
    with pytest.raises(ValueError, match="x_train"):
        np.savez(tmp_path / "other.npz", y=imgs)
        td.load_mnist_images(str(tmp_path / "other.npz"))
    with pytest.raises(FileNotFoundError):
        td.load_mnist_images(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="t10k"):
        td.load_mnist_images(str(tmp_path / "real"), train=False)
    # one IDX file holds one split: it never gives held-out digits, nor trains on t10k
    with pytest.raises(ValueError, match="one IDX file"):
        td.load_mnist_images(str(tmp_path / "train-images-idx3-ubyte.gz"), train=False)
    with pytest.raises(ValueError, match="one IDX file"):
        td.load_mnist_images(str(tmp_path / "t10k-images-idx3-ubyte"), train=True)


def test_real_mnist_splits_use_official_test_images_for_val_and_test(tmp_path):
    train = np.arange(4 * 28 * 28, dtype=np.int64).reshape(4, 28, 28) % 200
    t10k = 200 + np.arange(5)[:, None, None] + np.zeros((5, 28, 28), np.int64)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train.astype(np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", t10k.astype(np.uint8))
    path = str(tmp_path)
    assert np.array_equal(td.digit_pool("train", path), train)
    assert td.digit_pool("val", path)[:, 0, 0].tolist() == [200, 202, 204]
    assert td.digit_pool("test", path)[:, 0, 0].tolist() == [201, 203]
    for split, allowed in (("val", {0, 200, 202, 204}), ("test", {0, 201, 203})):
        v = td.make_dataset("moving_mnist", 3, 64, 4, split=split, data_dir=path)[1]["video"]
        assert set(np.unique((v.numpy() * 255).round()).astype(int)) <= allowed


def test_moving_mnist_test_file_and_npz_writer(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (20, 3, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "mnist_test_seq.npy", a)
    v = td.load_moving_mnist_test(str(tmp_path / "mnist_test_seq.npy"))
    assert v.shape == (3, 20, 1, 64, 64) and v.dtype == torch.float32
    assert torch.equal((v[1, 7, 0] * 255).round().byte(), torch.from_numpy(a[7, 1]))
    assert (
        td.load_moving_mnist_test(str(tmp_path / "mnist_test_seq.npy"), uint8=True).dtype
        == torch.uint8
    )
    ds = td.NpzVideos(str(tmp_path / "mnist_test_seq.npy"), num_frames=10)
    assert len(ds) == 3 and ds.channels == 1 and torch.equal(ds[1]["video"], v[1, :10])
    test = td.make_dataset(
        "npz", 10, 64, 20, split="test", data_dir=str(tmp_path / "mnist_test_seq.npy")
    )
    assert len(test) == 3 and torch.equal(test[2]["video"], v[2])
    for split in ("train", "val"):  # a test set is never trained or selected on
        with pytest.raises(ValueError, match="is a test set .*time-first"):
            td.make_dataset(
                "npz", 10, 64, 20, split=split, data_dir=str(tmp_path / "mnist_test_seq.npy")
            )
    np.save(tmp_path / "flat.npy", a[0])
    with pytest.raises(ValueError, match="time first"):
        td.load_moving_mnist_test(str(tmp_path / "flat.npy"))
    with pytest.raises(FileNotFoundError):
        td.load_moving_mnist_test(str(tmp_path / "missing.npy"))
    out = td.create_moving_mnist_dataset(
        str(tmp_path / "mm.npz"), num_samples=3, sequence_length=6, resolution=32
    )
    with np.load(out) as z:
        assert z["videos"].shape == (3, 6, 1, 32, 32) and z["videos"].dtype == np.uint8
    assert torch.allclose(
        td.NpzVideos(out)[2]["video"], td.MovingMNIST(3, 6, 32)[2]["video"], atol=0.5 / 255 + 1e-6
    )


# ----------------------------------------------------------------------------- smoke
def test_pressure_projection_removes_divergence():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(48, 64, generator=g), torch.randn(48, 64, generator=g)
    before = td.divergence(u, v).abs().mean()
    pu, pv = td.pressure_project(u, v)
    assert td.divergence(pu, pv).abs().mean() < 1e-5 * before
    assert (pu - u).abs().mean() < u.abs().mean()  # removes only part of the field
    su, sv = td.pressure_project(pu, pv)
    assert torch.allclose(su, pu, atol=1e-5) and torch.allclose(sv, pv, atol=1e-5)  # a projection


def test_advect_shifts_fields():
    f = torch.randn(2, 16, 16)
    out = td.advect(f, torch.full((16, 16), 2.0), torch.full((16, 16), -1.0))
    assert torch.allclose(out, f.roll((-1, 2), (1, 2)), atol=1e-4)  # moves right by 2, up by 1


def test_smoke_is_visible_rises_and_moves():
    ds = td.Smoke(4, resolution=64, num_frames=12)
    for i in range(4):
        v = ds[i]["video"]
        assert v[0].mean() > 0.01  # warm-up: smoke already on frame 0
        assert (v[-1] - v[0]).abs().mean() > 0.005  # it moves
        _, cy = centroid(v[-1].sum(0).numpy())
        assert cy < 0.75 * 64  # sources sit below 0.75 of the height: smoke has risen


# ------------------------------------------------------------------------- video folders and npz
def _gif(path, n, color):
    import imageio.v2 as iio

    frames = np.zeros((n, 40, 60, 3), np.uint8) + np.array(color, np.uint8)
    for t in range(n):  # a moving square: Pillow merges identical GIF frames
        frames[t, 10:20, 2 * t : 2 * t + 10] = 255 - np.array(color, np.uint8)
    iio.mimsave(path, list(frames), duration=0.1)


def test_video_folder_windows_splits_and_errors(tmp_path):
    import imageio.v2 as iio

    for k in range(7):
        _gif(tmp_path / f"clip{k}.gif", 10 + k, (40 * k, 100, 200))
    (tmp_path / "frames").mkdir()
    for k in range(9):
        iio.imwrite(tmp_path / "frames" / f"{k:03d}.png", np.full((30, 30), 20 * k, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    splits = {
        s: td.VideoFolder(str(tmp_path), num_frames=4, resolution=16, stride=2, split=s)
        for s in td.SPLITS
    }
    files = [f for s in td.SPLITS for f in splits[s].files]
    assert len(files) == len(set(files)) == 8 and all(splits[s].files for s in td.SPLITS)
    again = td.VideoFolder(str(tmp_path), num_frames=4, resolution=16, stride=2, split="train")
    assert again.files == splits["train"].files
    ds = splits["train"]
    assert len(ds) == sum((len(c) - 4) // 2 + 1 for c in ds.clips)
    item = ds[len(ds) - 1]["video"]
    assert (
        item.shape == (4, 3, 16, 16)
        and item.dtype == torch.float32
        and 0 <= item.min() <= item.max() <= 1
    )
    frames_ds = [s for s in splits.values() if any(f.endswith("frames") for f in s.files)][0]
    k = [i for i, f in enumerate(frames_ds.files) if f.endswith("frames")][0]
    # grey frames become RGB, in file-name order
    assert torch.allclose(frames_ds.clips[k][:, 0, 8, 8].float(), torch.arange(9.0) * 20, atol=1)
    assert len(td.VideoFolder(str(tmp_path), 4, 16, split="train", num_samples=2)) == 2
    with pytest.raises(ValueError, match="too many"):
        td.VideoFolder(str(tmp_path), num_frames=50, resolution=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        td.VideoFolder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        td.VideoFolder(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="broken.mp4"):
        td.VideoFolder(str(tmp_path / "bad"))


def test_split_files_by_name_hash():
    names = [f"/data/v{k}.mp4" for k in range(400)]
    sizes = {s: len(td.split_files(names, s)) for s in td.SPLITS}
    assert sum(sizes.values()) == 400 and 280 <= sizes["train"] <= 360 and 20 <= sizes["val"] <= 60
    moved = [n.replace("/data/", "/elsewhere/") for n in names]  # depends on the file name only
    assert [os.path.basename(n) for n in td.split_files(moved, "test")] == [
        os.path.basename(n) for n in td.split_files(names, "test")
    ]


def test_video_folder_with_few_files(tmp_path):
    _gif(tmp_path / "a.gif", 6, (10, 20, 30))
    _gif(tmp_path / "b.gif", 6, (10, 20, 30))
    assert len(td.make_dataset("folder", 10, 16, 3, data_dir=str(tmp_path))) == 4
    with pytest.raises(ValueError, match="at least 3"):
        td.make_dataset("folder", 10, 16, 3, split="val", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- clips
def test_clip_helpers():
    video = torch.arange(10.0)[:, None, None, None].expand(10, 2, 3, 3)
    ctx, tgt = td.split_context_target(video, 4)
    assert ctx.shape[0] == 4 and tgt.shape[0] == 6 and tgt[0, 0, 0, 0] == 4
    bctx, btgt = td.split_context_target(video[None].expand(5, -1, -1, -1, -1), 7)
    assert bctx.shape == (5, 7, 2, 3, 3) and btgt.shape == (5, 3, 2, 3, 3)
    w = td.sliding_windows(video, 4, 3)
    assert w.shape == (3, 4, 2, 3, 3) and w[2, :, 0, 0, 0].tolist() == [6, 7, 8, 9]
    assert td.sliding_windows(video[None].expand(2, -1, -1, -1, -1), 5, 5).shape == (4, 5, 2, 3, 3)
    a = td.random_window(video, 3, torch.Generator().manual_seed(1))
    b = td.random_window(video, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a[1:, 0, 0, 0] - a[:-1, 0, 0, 0], torch.ones(2))
    for bad in (
        lambda: td.split_context_target(video, 10),
        lambda: td.sliding_windows(video, 11),
        lambda: td.random_window(video, 0),
    ):
        with pytest.raises(ValueError):
            bad()


# ----------------------------------------------------------------------------- CLI
def test_cli_writes_npz_that_reads_back(tmp_path, capsys):
    out, gif = str(tmp_path / "shapes.npz"), str(tmp_path / "shapes.gif")
    td.main(
        [
            "--kind",
            "shapes",
            "--num",
            "3",
            "--out",
            out,
            "--resolution",
            "16",
            "--frames",
            "4",
            "--seed",
            "2",
            "--preview",
            gif,
        ]
    )
    assert "wrote" in capsys.readouterr().out
    ds, ref = td.NpzVideos(out), td.ToyDataset(3, 16, 16, 4, seed=2)
    assert len(ds) == 3 and ds.channels == 3
    for i in range(3):
        assert torch.allclose(ds[i]["video"], ref[i]["video"], atol=0.5 / 255 + 1e-6)
        assert ds[i]["prompt"] == ref[i]["prompt"]
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 4


def test_cli_writes_a_split_file_with_states(tmp_path):
    flags = "--kind bouncing_balls --num 2 --frames 3 --split val --out".split()
    td.main([*flags, str(tmp_path / "b.npz")])
    with np.load(tmp_path / "b.npz") as z:
        assert z["videos"].shape == (2, 3, 3, 64, 64) and z["videos"].dtype == np.uint8
        assert z["states"].shape == (2, 3, 5, 4)
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    os.replace(tmp_path / "b.npz", split_dir / "val.npz")
    assert len(td.make_dataset("npz", 10, 32, 2, split="val", data_dir=str(split_dir))) == 2
    assert td.make_dataset("npz", 10, 32, 2, split="val", data_dir=str(split_dir))[0][
        "video"
    ].shape == (2, 3, 32, 32)
    with pytest.raises(SystemExit, match="valid"):
        td.main(["--kind", "cats", "--num", "2", "--out", str(tmp_path / "c.npz")])
    with pytest.raises(FileNotFoundError):
        td.NpzVideos(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "novid.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="videos"):
        td.NpzVideos(str(tmp_path / "novid.npz"))


def test_moving_mnist_dataset_constructor_and_cli(tmp_path):
    """MovingMNISTDataset: the VideoGPT loader's arguments reach the generator (length, resolution,
    digits, speed, split, seed); `--kind moving_mnist --out` writes uint8 clips and states."""
    ds = td.MovingMNISTDataset(
        sequence_length=5,
        resolution=32,
        num_digits=1,
        canvas_size=48,
        max_velocity=0.05,
        videos_per_digit=2,
        seed=3,
    )
    item = ds[1]
    assert len(ds) == 20 and item["video"].shape == (5, 1, 32, 32)
    assert item["states"].shape == (5, 1, 4)
    speed = item["states"][:, 0, 2:].norm(dim=-1)  # pixels per frame at 32 px
    assert torch.allclose(speed, torch.full((5,), 0.05 * (48 - 28) * 32 / 48), atol=1e-4)
    same = td.MovingMNIST(20, 5, 32, 1, 28, 48, 0.05, train=True, seed=3)[1]["video"]
    assert torch.equal(item["video"], same)
    test = td.MovingMNISTDataset(sequence_length=5, resolution=32, train=False, seed=3)[1]
    assert torch.equal(test["video"], td.MovingMNIST(20, 5, 32, train=False, seed=3)[1]["video"])
    assert not torch.equal(test["video"], td.MovingMNIST(20, 5, 32, train=True, seed=3)[1]["video"])
    out = tmp_path / "mm.npz"
    td.main(
        [
            "--kind",
            "moving_mnist",
            "--num",
            "2",
            "--frames",
            "3",
            "--resolution",
            "16",
            "--out",
            str(out),
        ]
    )
    with np.load(out) as z:
        assert z["videos"].shape == (2, 3, 1, 16, 16) and z["videos"].dtype == np.uint8
        assert z["states"].shape == (2, 3, 2, 4)


# ----------------------------------------------------------------------------- splits never overlap
def _split_videos(kind, n=5, **kw):
    return {
        s: [td.make_dataset(kind, n, 16, 3, seed=7, split=s, **kw)[i]["video"] for i in range(n)]
        for s in td.SPLITS
    }


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_generated_splits_share_no_video(kind):
    videos = _split_videos(kind)
    seen = {}
    for split, vs in videos.items():
        for v in vs:
            key = (v.numpy() * 255).round().astype(np.uint8).tobytes()
            assert seen.setdefault(key, split) == split, (
                f"{kind}: a {split} video is also in {seen[key]}"
            )


def _constant_videos(path, n):
    """n videos (N, 2, 1, 8, 8); video i is the constant i, so a video's value is its position."""
    v = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None, None], (n, 2, 1, 8, 8))
    np.savez(path, videos=v)
    return str(path)


def _values(ds):
    return [int(ds[i]["video"][0, 0, 0, 0] * 255 + 0.5) for i in range(len(ds))]


def test_single_npz_file_splits_by_position(tmp_path):
    path = _constant_videos(tmp_path / "mine.npz", 25)
    got = {s: _values(td.make_dataset("npz", 100, 8, 2, split=s, data_dir=path)) for s in td.SPLITS}
    # 25 videos: 2 (a tenth, rounded down) each for val and test, the first 21 for training
    assert got == {"train": list(range(21)), "val": [21, 22], "test": [23, 24]}
    assert _values(td.make_dataset("npz", 5, 8, 2, split="train", data_dir=path)) == list(range(5))
    assert _values(td.NpzVideos(path)) == list(range(25))  # a plain NpzVideos reads every video
    few = _constant_videos(tmp_path / "few.npz", 3)
    assert [_values(td.make_dataset("npz", 9, 8, 2, split=s, data_dir=few)) for s in td.SPLITS] == [
        [0],
        [1],
        [2],
    ]
    two = _constant_videos(tmp_path / "two.npz", 2)
    assert _values(td.make_dataset("npz", 9, 8, 2, data_dir=two)) == [0, 1]
    with pytest.raises(ValueError, match="at least 3"):
        td.make_dataset("npz", 9, 8, 2, split="val", data_dir=two)


def test_held_out_files_serve_their_split_only(tmp_path, capsys):
    test_npz = str(tmp_path / "test_clips.npz")
    td.main(
        ["--kind", "pendulum", "--num", "4", "--frames", "2", "--resolution", "16"]
        + ["--split", "test", "--out", test_npz]
    )
    assert "serves as test data only" in capsys.readouterr().out
    ds = td.make_dataset("npz", 10, 16, 2, split="test", data_dir=test_npz)
    assert len(ds) == 4  # all of it: a test file is not split again
    with pytest.raises(ValueError, match="is a test set .*records split 'test'"):
        td.make_dataset("npz", 10, 16, 2, split="train", data_dir=test_npz)
    # in a folder of split files, each file must hold its own split
    folder = tmp_path / "splits"
    folder.mkdir()
    os.replace(test_npz, folder / "val.npz")
    with pytest.raises(ValueError, match="holds test videos .*cannot be the val file"):
        td.make_dataset("npz", 10, 16, 2, split="val", data_dir=str(folder))


def test_cli_writes_the_standard_test_layout_with_held_out_digits(tmp_path, capsys):
    out = str(tmp_path / "mnist_test_seq.npy")
    td.main(
        ["--kind", "moving_mnist", "--split", "test", "--num", "3", "--frames", "5", "--out", out]
    )
    assert "time first" in capsys.readouterr().out
    a = np.load(out)
    assert a.shape == (5, 3, 64, 64) and a.dtype == np.uint8
    ref = td.MovingMNIST(3, 5, split="test")
    for i in range(3):
        assert np.array_equal(a[:, i], (ref[i]["video"][:, 0].numpy() * 255).round())
    with pytest.raises(SystemExit, match="--split test"):
        td.main(["--kind", "moving_mnist", "--num", "2", "--frames", "3", "--out", out])
    with pytest.raises(SystemExit, match="grey"):
        td.main(["--kind", "smoke", "--split", "test", "--num", "1", "--frames", "2", "--out", out])


def test_data_dir_implies_its_kind(tmp_path):
    (tmp_path / "vids").mkdir()
    _gif(tmp_path / "vids" / "a.gif", 4, (10, 20, 30))
    videos = _constant_videos(tmp_path / "mine.npz", 4)
    np.save(tmp_path / "seq.npy", np.zeros((20, 2, 64, 64), np.uint8))
    (tmp_path / "split").mkdir()
    _constant_videos(tmp_path / "split" / "train.npz", 4)
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    np.savez(tmp_path / "fashion.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    expected = {
        "vids": "folder",
        "mine.npz": "npz",
        "seq.npy": "npz",
        "split": "npz",
        "mnist": "moving_mnist",
        "mnist/train-images-idx3-ubyte.gz": "moving_mnist",
        "fashion.npz": "moving_mnist",
    }
    for name, kind in expected.items():
        path = str(tmp_path / name)
        assert td.data_kind("smoke", path, default="smoke") == kind, name
        assert td.data_kind(kind, path, default="smoke") == kind
    assert td.data_kind("pendulum", None, default="smoke") == "pendulum"
    with pytest.raises(ValueError, match="--data pendulum is generated and reads no --data-dir"):
        td.data_kind("pendulum", videos, default="smoke")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        td.data_kind("smoke", str(tmp_path / "nowhere"), default="smoke")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell what"):
        td.data_kind("smoke", str(tmp_path / "notes.txt"), default="smoke")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        td.data_kind("smoke", str(tmp_path / "empty"), default="smoke")
    with pytest.raises(ValueError, match="unknown data kind"):
        td.data_kind("cats", videos, default="smoke")


# ------------------------------------------------------------ steady clips (rules per frame)
STEADY_PROMPTS = (
    "A red circle moving from left to right",
    "A green triangle moving from bottom right to top left",
    "A yellow square rotating clockwise",
    "A blue triangle rotating counter-clockwise",
    "Color gradient transitioning from cyan to orange",
    "A white ball bouncing",
)


def _steady(prompt, t, i=0, n=12, res=32):
    rng = np.random.default_rng([3, i])
    return td.render_attrs(rng, td.parse_prompt(prompt), res, res, t, steady=n).numpy()


@pytest.mark.parametrize("prompt", STEADY_PROMPTS)
def test_a_long_steady_clip_starts_as_the_short_one(prompt):
    assert np.array_equal(_steady(prompt, 48)[:12], _steady(prompt, 12))


@pytest.mark.parametrize("way,sign", [("left to right", 1), ("right to left", -1)])
def test_steady_shapes_move_at_one_speed_the_prompted_way_and_wrap_in_sight(way, sign):
    for i in range(4):
        m = _steady(f"A red circle moving from {way}", 48, i).sum(1)
        mass = m.sum((1, 2))
        assert mass.min() > 0.97 * mass.max()  # on a torus: never out of sight
        # x of the centre from the phase of the first Fourier mode along x (wrap-proof)
        cols = m.sum(1)
        phase = np.angle((cols * np.exp(2j * np.pi * np.arange(32) / 32)).sum(1))
        # px per frame the prompted way
        step = np.mod(sign * np.diff(phase), 2 * np.pi) * 32 / (2 * np.pi)
        lo, hi = 0.6 * (32 - 2 * 6.4 - 3) / 11, (32 - 2 * 3.84 - 3) / 11  # r in [3.84, 6.4]
        assert np.ptp(step) < 0.05 and lo - 0.01 < step.mean() < hi + 0.01, step
        assert step.sum() > 32  # it crossed the frame edge at least once in 48 frames
        y = (m.sum(2) * (np.arange(32) + 0.5)).sum(1) / mass
        assert np.ptp(y) < 0.1  # nothing moves up or down (anti-aliasing: a few hundredths)


@pytest.mark.parametrize(
    "prompt,fold,sign",
    [
        ("A yellow square rotating clockwise", 4, 1),
        ("A blue triangle rotating counter-clockwise", 3, -1),
    ],
)
def test_steady_rotation_starts_upright_and_turns_at_one_speed(prompt, fold, sign):
    for i in range(3):
        m = _steady(prompt, 24, i, res=64).sum(1)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        angles = []
        for f in m:
            cx, cy = centroid(f)
            z = (f * ((xs - cx) + 1j * (ys - cy)) ** fold).sum()
            angles.append(np.angle(z) / fold)
        turn = np.angle(np.exp(1j * fold * np.diff(angles))) / fold
        assert np.allclose(turn, sign * 0.14, atol=0.01), turn  # y down: + is clockwise
    up = _steady(prompt, 1, 0, res=64).sum(1)[0]  # frame 0 alone: the shape at angle 0
    cx, cy = centroid(up)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    z = (up * ((xs - cx) + 1j * (ys - cy)) ** fold).sum()
    # upright: an axis-aligned square's 4-fold moment is real and negative (its corners, at 45
    # degrees, weigh most); a triangle with its tip up (-y on screen) has it along (-i)^3 = i
    want = np.pi if fold == 4 else np.pi / 2
    assert abs(np.angle(z * np.exp(-1j * want))) < 0.05, np.angle(z)


def test_steady_gradient_cycles_and_first_sweep_is_the_default_clip():
    v = _steady("Color gradient transitioning from cyan to orange", 45)
    rng = np.random.default_rng([3, 0])
    attrs = td.parse_prompt("Color gradient transitioning from cyan to orange")
    default = td.render_attrs(rng, attrs, 32, 32, 12).numpy()
    assert np.allclose(v[:12], default, atol=1e-5)
    assert np.allclose(v[22], v[0], atol=1e-5) and np.allclose(v[44], v[0], atol=1e-5)
    assert np.allclose(v[11 + 5], v[11 - 5], atol=1e-5)  # back the way it came


def test_steady_needs_a_clip_length():
    with pytest.raises(ValueError, match="steady"):
        td.ToyDataset(2, 16, 16, 4, steady=1)
    a, b = td.ToyDataset(3, 16, 16, 24, steady=12), td.ToyDataset(3, 16, 16, 12, steady=12)
    assert torch.equal(a[2]["video"][:12], b[2]["video"]) and a[2]["prompt"] == b[2]["prompt"]


# ----------------------------------------------------------------------------- agent in a room
STEP = {1: (0, -1), 2: (0, 1), 3: (-1, 0), 4: (1, 0)}  # up, down, left, right; y points down


def _room(agent, balls, blocks=()):
    walls = np.zeros((8, 8), bool)
    walls[[0, -1], :] = walls[:, [0, -1]] = True
    for x, y in blocks:
        walls[y, x] = True
    return td.AgentRoom(walls, agent, balls)


def test_agent_items_shapes_and_determinism():
    ds = td.make_dataset("agent", 3, 32, 12, seed=5)
    item = ds[1]
    assert item["video"].shape == (12, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["actions"].shape == (12,) and item["actions"].dtype == torch.int64
    assert item["states"].shape == (12, 4, 2) and item["events"].shape == (12,)
    assert 0 <= item["actions"].min() and item["actions"].max() < len(td.ACTIONS)
    again = td.make_dataset("agent", 3, 32, 12, seed=5)[1]
    assert all(torch.equal(item[k], again[k]) for k in item)
    val = td.make_dataset("agent", 3, 32, 12, seed=5, split="val")[1]
    assert not torch.equal(item["video"], val["video"])
    with pytest.raises(ValueError, match="multiple of 8"):
        td.make_dataset("agent", 3, 36, 12)


def test_agent_actions_move_the_agent_one_cell_in_the_next_frame():
    """actions[t] acts after frame t: a move into a free cell is +1 cell in frame t + 1 (read from
    the states and from the pixels), 'none' and blocked moves stay; replaying the actions from
    the clip's room gives the same frames."""
    ds = td.make_dataset("agent", 6, 32, 24, seed=2)
    moved = 0
    for i in range(6):
        item = ds[i]
        s, a, e = item["states"][:, 0], item["actions"], item["events"]
        for t in range(23):
            want = s[t] + torch.tensor(STEP.get(int(a[t]), (0, 0))) * (e[t] in (1, 3))
            assert torch.equal(s[t + 1], want), (i, t)
            moved += int(e[t] == 1 and a[t] == 4)
        assert torch.equal(td.agent_cells(item["video"]), s.float())  # the pixels agree
        room, _ = ds.room(i)
        replay = ds.replay(room, a)
        assert torch.equal(replay["video"], item["video"])
    assert moved > 0  # some 'right' into a free cell was seen
    rates = torch.bincount(torch.cat([ds[i]["events"] for i in range(6)]), minlength=5)
    assert (rates > 0).all()  # idle, moved, blocked, pushed and ball_blocked all happen


def test_agent_walls_block_and_pushes_move_one_ball_one_cell():
    room = _room((2, 2), [(3, 2)], blocks=[(2, 1)])
    assert room.step(1) == 2 and room.agent == (2, 2)  # up into a wall block
    assert room.step(4) == 3 and room.agent == (3, 2) and room.balls == [(4, 2)]  # push
    assert room.step(0) == 0 and room.agent == (3, 2)
    room = _room((5, 3), [(6, 3)])
    assert room.step(4) == 4 and room.agent == (5, 3) and room.balls == [(6, 3)]  # ball at wall
    room = _room((2, 4), [(3, 4), (4, 4)])
    assert room.step(4) == 4 and room.balls == [(3, 4), (4, 4)]  # a ball behind the ball
    room = _room((1, 1), [])
    assert room.step(3) == 2 and room.step(1) == 2 and room.agent == (1, 1)  # border walls
    assert room.step(2) == 1 and room.agent == (1, 2)


def test_agent_rooms_keep_balls_and_nothing_overlaps():
    ds = td.make_dataset("agent", 8, 32, 32, seed=7)
    for i in range(8):
        room, _ = ds.room(i)
        s = ds[i]["states"]
        n = int((s[0, :, 0] >= 0).sum())
        for t in range(32):
            cells = [tuple(c) for c in s[t].tolist() if c[0] >= 0]
            assert len(cells) == n and len(set(cells)) == n  # count constant, no overlaps
            assert not any(room.walls[y, x] for x, y in cells)


def test_agent_position_error_scores_the_simulator_zero_and_degenerate_videos_badly():
    """Before position error is evidence: the simulator's own frames score 0 and hit every cell;
    black, frozen, time-shuffled and noise videos score worse."""
    ds = td.make_dataset("agent", 6, 32, 24, seed=1)
    videos = torch.stack([ds[i]["video"] for i in range(6)])
    cells = torch.stack([ds[i]["states"][:, 0] for i in range(6)])
    err, hit = td.position_error(videos, cells)
    assert err.max() == 0 and hit.min() == 1
    g = torch.Generator().manual_seed(0)
    bad = {
        "black": torch.zeros_like(videos),
        "frozen": videos[:, :1].expand_as(videos),
        "shuffled": videos[:, torch.randperm(24, generator=g)],
        "noise": torch.rand(videos.shape, generator=g),
    }
    for name, v in bad.items():
        e, h = td.position_error(v, cells)
        assert e.mean() > 0.5 and h.mean() < 0.9, name
    assert td.position_error(bad["black"], cells)[0].min() == td.AGENT_GRID  # lost everywhere


def test_folder_actions_files_and_their_errors(tmp_path):
    """<stem>.actions.txt (ids, names, -1; one per frame or one fewer) or <stem>.actions.npz
    beside each video; bad files stop with one line naming the file and what is wrong."""
    for k in range(2):  # fewer than 3 files: all of them are the train split
        _gif(tmp_path / f"clip{k}.gif", 6, (40 * k, 100, 200))
    (tmp_path / "clip0.actions.txt").write_text("right\n2\n-1\nup\nnone\n4\n")
    (tmp_path / "clip1.actions.txt").write_text("1\n1\n1\n1\n1\n")
    ds = td.VideoFolder(str(tmp_path), num_frames=6, resolution=16)
    by_file = {os.path.basename(f): a.tolist() for f, a in zip(ds.files, ds.actions)}
    assert by_file == {"clip0.gif": [4, 2, -1, 1, 0, 4], "clip1.gif": [1, 1, 1, 1, 1, -1]}
    assert ds[0]["actions"].tolist() == by_file[os.path.basename(ds.files[ds.index[0][0]])]
    (tmp_path / "clip1.actions.txt").unlink()
    np.savez(tmp_path / "clip1.actions.npz", actions=np.arange(6) % 5)
    ds = td.VideoFolder(str(tmp_path), num_frames=6, resolution=16)
    assert ds.actions[ds.files.index(str(tmp_path / "clip1.gif"))].tolist() == [0, 1, 2, 3, 4, 0]
    bad = {
        "has 4 actions for a video of 6 frames": "1\n2\n3\n4",
        "line 3: unknown action 'jump'": "1\n2\njump\n4\n0\n0",
        "line 1: unknown action '7'": "7\n0\n0\n0\n0\n0",
    }
    for message, text in bad.items():
        (tmp_path / "clip0.actions.txt").write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            td.VideoFolder(str(tmp_path), num_frames=6, resolution=16)
        assert "clip0.actions.txt" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "clip0.actions.txt").unlink()
    with pytest.raises(ValueError, match="clip0.gif has no actions file"):
        td.VideoFolder(str(tmp_path), num_frames=6, resolution=16)
    (tmp_path / "clip1.actions.npz").unlink()
    assert "actions" not in td.VideoFolder(str(tmp_path), num_frames=6, resolution=16)[0]


@pytest.mark.parametrize("res", [32, 64])
def test_ball_map_reads_the_cells_of_every_ball_and_none_of_black(res):
    """The cells that hold a ball, read from pixels, equal the states' ball cells on simulated
    frames (a plain loop marks them); black frames hold none, and neither does the agent's cell."""
    ds = td.make_dataset("agent", 6, res, 12, seed=3)
    for i in range(6):
        item = ds[i]
        want = torch.zeros(12, td.AGENT_GRID, td.AGENT_GRID, dtype=torch.bool)
        for t in range(12):
            for x, y in item["states"][t, 1:].tolist():
                if x >= 0:
                    want[t, y, x] = True
        assert torch.equal(td.ball_map(item["video"]), want), i
    assert not td.ball_map(torch.zeros(2, 3, res, res)).any()
