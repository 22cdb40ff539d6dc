"""train_world_model.py with actions: alignment and causality of the action input in every
dynamics type, the null action, batches, a tiny --actions run (metrics, checkpoint, refusals),
headless play against rollout(), the counterfactual score on stubs, and (slow) control after a
short training run."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import tyro

import toy_data as td
import train_world_model as wm

TINY = (
    "--steps 4 --log-every 1 --eval-every 2 --sample-every 2 --ckpt-every 2 "
    "--data agent --actions --resolution 32 --latent-grid 8 --frames 8 --context 3 --horizon 2 "
    "--train-clips 4 --eval-clips 3 --test-clips 3 --width 4 --hidden 8 --heads 2 --batch-size 2 "
    "--dtype float32 --no-compile --device cpu --warmup-steps 1 --lr 3e-3"
).split()
A = len(td.ACTIONS)


def run(out_dir, *extra, base=TINY):
    wm.main(tyro.cli(wm.Args, args=[*base, "--out-dir", str(out_dir), *extra]))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def action_model(dynamics):
    torch.manual_seed(0)
    model = wm.WorldModel(
        3, 4, 4, dynamics, hidden=8, layers=2, heads=2, grid=4, window=3, num_actions=A
    )
    with torch.no_grad():  # the output layers start at zero: make the dynamics do something
        for p in model.dynamics.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ref_rollout(model, z_context, steps, actions):
    """A plain loop: step t reads latent t (context, then the last prediction) with the
    embedding row of actions[:, t], the spare last row for -1."""
    rows = torch.where(actions < 0, A, actions)
    emb = model.action_embed.weight[rows]  # (B, T, hidden)
    state, preds = None, []
    z = None
    for t in range(z_context.shape[1] + steps - 1):
        x = z_context[:, t] if t < z_context.shape[1] else z
        z, state = model.dynamics(x.contiguous(), state, emb[:, t])
        if t >= z_context.shape[1] - 1:
            preds.append(z)
    return torch.stack(preds, 1)


@pytest.mark.parametrize("dynamics", wm.DYNAMICS)
def test_rollout_reads_action_t_with_frame_t(dynamics):
    model = action_model(dynamics)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 4, 4, 4, generator=g)
    actions = torch.randint(-1, A, (2, 3 + 4 - 1), generator=g)
    with torch.no_grad():
        got = model.rollout(z, 4, actions)
        want = ref_rollout(model, z, 4, actions)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dynamics", wm.DYNAMICS)
def test_prediction_is_causal_in_the_actions(dynamics):
    """Frame c + j (prediction j) depends on actions up to c + j - 1 only: changing later actions
    leaves it unchanged, changing action c + j - 1 changes it, and its gradient reaches that
    action's embedding row but not the row of an action only taken later."""
    model = action_model(dynamics)
    g = torch.Generator().manual_seed(2)
    ctx = torch.rand(2, 3, 3, 32, 32, generator=g)
    actions = torch.tensor([[0, 0, 1, 1, 3, 3], [0, 0, 1, 1, 3, 3]])
    with torch.no_grad():
        _, pred, _ = model(ctx, 4, actions)
        later = actions.clone()
        later[:, 4:] = 4
        _, pred_later, _ = model(ctx, 4, later)
        now = actions.clone()
        now[:, 3] = 2
        _, pred_now, _ = model(ctx, 4, now)
    assert torch.equal(pred[:, :2], pred_later[:, :2])  # frames c, c + 1 use actions 2, 3
    assert not torch.allclose(pred[:, 2], pred_later[:, 2])  # frame c + 2 uses action 4
    assert torch.equal(pred[:, :1], pred_now[:, :1])
    assert not torch.allclose(pred[:, 1], pred_now[:, 1])
    _, pred, _ = model(ctx, 3, actions)
    pred[:, 1].sum().backward()  # frame c + 1: actions 0..3 are 0 and 1; 3 (left) comes later
    grad = model.action_embed.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() > 0
    assert grad[3].abs().sum() == 0 and grad[A].abs().sum() == 0


@pytest.mark.parametrize("dynamics", wm.DYNAMICS)
def test_each_clip_of_a_batch_gets_its_own_actions(dynamics):
    """Two clips with the same context and other actions: each row equals that clip rolled out
    alone, and the rows differ."""
    model = action_model(dynamics)
    z = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(4)).expand(
        2, -1, -1, -1, -1
    )
    actions = torch.tensor([[1, 1, 1, 1, 1], [4, 4, 2, 2, 0]])
    with torch.no_grad():
        both = model.rollout(z, 3, actions)
        alone = [model.rollout(z[:1], 3, actions[i : i + 1]) for i in range(2)]
    assert torch.allclose(both, torch.cat(alone), atol=1e-6)
    assert not torch.allclose(both[0], both[1])


def test_unknown_action_is_the_spare_row_and_no_actions_no_table():
    model = action_model("gru")
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        a = model.step(z, None, torch.tensor([-1, 2]))[0]
        b = model.dynamics(z, None, model.action_embed.weight[torch.tensor([A, 2])])[0]
    assert torch.equal(a, b) and model.action_embed.num_embeddings == A + 1
    plain = wm.WorldModel(3, 4, 4, "gru", hidden=8, grid=4)
    assert not any("action" in k for k in plain.state_dict())


def test_batches_carry_their_actions_and_drop_whole_clips():
    args = wm.Args(context=2, horizon=3, batch_size=64, action_dropout=0.0)
    pool = torch.arange(4 * 9).view(4, 9, 1, 1, 1).to(torch.uint8)  # clip i, frame t -> 9 i + t
    actions = torch.arange(4 * 9).view(4, 9) + 100  # the same numbering, shifted
    x, a = wm.sample_batch(
        pool, torch.Generator().manual_seed(0), args, torch.device("cpu"), actions
    )
    assert torch.equal(a - 100, (x.flatten(1) * 255).round().long())  # action t of frame t
    args.action_dropout = 0.5
    x, a = wm.sample_batch(
        pool, torch.Generator().manual_seed(0), args, torch.device("cpu"), actions
    )
    dropped = (a == -1).all(1)
    assert ((a == -1).any(1) == dropped).all()  # whole clips, never single steps
    assert 16 < int(dropped.sum()) < 48
    assert torch.equal(a[~dropped] - 100, (x[~dropped].flatten(1) * 255).round().long())
    g = torch.Generator().manual_seed(3)
    assert torch.equal(wm.drop_actions(actions, g, 0.0), actions)
    assert (wm.drop_actions(actions, g, 1.0) == -1).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("tiny_actions")
    run(out)
    return out


def test_tiny_action_run_writes_control_metrics_and_checkpoint(tiny):
    m = json.load(open(tiny / "metrics.json"))
    assert set(m["baselines"]) == {"copy_last", "actions_zeroed"}
    for scores in (m["eval"], m["baselines"]["copy_last"], m["baselines"]["actions_zeroed"]):
        assert len(scores["agent_error_per_frame"]) == 6  # 3 x --horizon
        assert 0 <= scores["agent_error"] <= td.AGENT_GRID
    cf = m["counterfactual"]
    assert cf["branches"] == ["up", "down", "left", "right"] and len(cf["error_matrix"]) == 4
    assert cf["simulator_spread"] > 0
    assert os.path.isfile(tiny / "samples" / "counterfactual.png")
    ck = torch.load(tiny / "ckpt.pt", weights_only=True)
    assert ck["arch"]["num_actions"] == A and ck["arch"]["action_names"] == list(td.ACTIONS)


def test_checkpoint_refuses_other_actions_and_data_without_actions(tiny, tmp_path, capsys):
    no_actions = [f for f in TINY if f != "--actions"]
    with pytest.raises(SystemExit, match="takes 5 actions.*pass --actions"):
        run(tiny, "--eval-only", base=no_actions)
    with pytest.raises(SystemExit, match="--actions needs data with actions"):
        run(tmp_path, "--data", "bouncing_balls")
    with pytest.raises(SystemExit, match="--play needs a checkpoint"):
        run(tmp_path / "none", "--play-actions", "RR")
    with pytest.raises(SystemExit, match="X is not one"):
        run(tiny, "--play-actions", "RXR")


def test_headless_play_writes_the_gif_and_equals_rollout(tiny, capsys):
    run(tiny, "--play-actions", "RRUULDN")
    out = capsys.readouterr().out
    assert "played 7 steps at" in out and os.path.getsize(tiny / "samples" / "play.gif") > 0
    assert os.path.getsize(tiny / "samples" / "play.png") > 0
    args = tyro.cli(wm.Args, args=[*TINY, "--out-dir", str(tiny), "--play-actions", "RRUULDN"])
    model = wm.WorldModel(**wm.model_arch(args, 3))
    model.load_state_dict(torch.load(tiny / "ckpt.pt", weights_only=True)["model"])
    model.eval()
    frames = wm.play_headless(model, args, torch.device("cpu"))
    again = wm.play_headless(model, args, torch.device("cpu"))
    assert torch.equal(frames, again) and frames.shape == (7, 3, 32, 32)
    item = td.make_dataset("agent", 1, 32, 3, 0, "test")[0]
    ctx = (item["video"] * 255).round() / 255
    played = torch.tensor([4, 4, 1, 1, 3, 2, 0])
    actions = torch.cat([item["actions"][:2], played])[None]
    with torch.no_grad():
        _, pred, _ = model(ctx[None], 7, actions)
    assert torch.allclose(frames, pred[0].clamp(0, 1), atol=1e-5)


def test_play_keys_cover_every_action_and_clash_with_nothing():
    assert set(wm.PLAY_KEYS.values()) == set(range(A)) == set(wm.PLAY_LETTERS.values())
    assert not {wm.PLAY_RESET, wm.PLAY_QUIT} & set(wm.PLAY_KEYS)


class Stub(nn.Module):
    """A model whose prediction is the last context frame shifted by each action (follows_actions)
    or repeated (action-blind): forward as WorldModel's."""

    def __init__(self, follows_actions):
        super().__init__()
        self.follows = follows_actions
        self.rollouts = []  # the (window, reencode) of each call

    def forward(self, context, steps, actions, window=0, reencode=False):
        self.rollouts.append((window, reencode))
        frame, out = context[:, -1], []
        cell = context.shape[-1] // td.AGENT_GRID
        for j in range(steps):
            a = actions[:, context.shape[1] - 1 + j]
            if self.follows:
                dx = torch.tensor([td.MOVES[int(k)][0] for k in a]).view(-1, 1, 1, 1)
                dy = torch.tensor([td.MOVES[int(k)][1] for k in a]).view(-1, 1, 1, 1)
                frame = torch.stack(
                    [
                        f.roll((int(y) * cell, int(x) * cell), (-2, -1))
                        for f, x, y in zip(frame, dx, dy)
                    ]
                )
            out.append(frame)
        return None, torch.stack(out, 1), None


def test_counterfactual_separates_a_model_that_follows_actions_from_a_blind_one():
    args = wm.Args(data="agent", resolution=32, context=3, horizon=3)
    blind, _ = wm.counterfactual(Stub(False), args, torch.device("cpu"), n_clips=6)
    follows, _ = wm.counterfactual(Stub(True), args, torch.device("cpu"), n_clips=6)
    assert blind["model_spread"] == 0 and blind["simulator_spread"] > 0
    assert abs(blind["matched_error"] - blind["mismatched_error"]) < 1e-6
    assert follows["model_spread"] > 0
    assert follows["matched_error"] < follows["mismatched_error"] - 0.5


def test_counterfactual_rolls_out_as_evaluation_does():
    """The branches roll out with the run's --rollout-window and --reencode, as play does."""
    stub = Stub(True)
    args = wm.Args(data="agent", resolution=32, context=3, horizon=3, rollout_window=1)
    wm.counterfactual(stub, replace(args, reencode=True), torch.device("cpu"), n_clips=2)
    wm.counterfactual(stub, args, torch.device("cpu"), n_clips=2)
    assert stub.rollouts == [(1, True)] * 2 + [(1, False)] * 2


@pytest.mark.slow
def test_after_short_training_actions_change_the_prediction(tmp_path):
    """A short --actions run: from the same context, the branches differ, and each lies nearer its
    own simulator branch than the others."""
    short = [f for f in TINY]
    for flag, value in (("--steps", "300"), ("--width", "8"), ("--hidden", "32")):
        short[short.index(flag) + 1] = value
    run(
        tmp_path, "--eval-every", "300", "--ckpt-every", "300", "--sample-every", "1000", base=short
    )
    cf = json.load(open(tmp_path / "metrics.json"))["counterfactual"]
    assert cf["model_spread"] > 0.3
    assert cf["matched_error"] < cf["mismatched_error"]


def test_play_window_steps_on_keys_resets_and_quits(tiny, monkeypatch):
    """The --play window on Agg: arrow keys step (the panels change), r shows the first panels
    again, q closes it; matplotlib's own keymap (s saves, q quits, ...) is disconnected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import KeyEvent

    monkeypatch.setattr(plt, "show", lambda: None)
    args = tyro.cli(wm.Args, args=[*TINY, "--out-dir", str(tiny), "--play"])
    ck = torch.load(tiny / "ckpt.pt", weights_only=True)
    model = wm.WorldModel(**ck["arch"]).eval()
    model.load_state_dict(ck["model"])
    wm.play_window(model, args, torch.device("cpu"))
    fig = plt.gcf()
    default = fig.canvas.manager.key_press_handler_id
    assert default not in fig.canvas.callbacks.callbacks["key_press_event"]
    image = fig.axes[0].images[0]
    first = image.get_array().copy()
    seen = []
    for key in ("right", "down", "left", "up", "w"):
        fig.canvas.callbacks.process(
            "key_press_event", KeyEvent("key_press_event", fig.canvas, key)
        )
        seen.append(image.get_array().copy())
    assert any(not np.array_equal(s, first) for s in seen)
    assert first.shape[1] > 2 * first.shape[0]  # model | simulator | difference
    fig.canvas.callbacks.process("key_press_event", KeyEvent("key_press_event", fig.canvas, "r"))
    assert np.array_equal(image.get_array(), first)
    fig.canvas.callbacks.process("key_press_event", KeyEvent("key_press_event", fig.canvas, "q"))
    assert not plt.fignum_exists(fig.number)


def pushed_clip():
    """A test clip of the agent kind with balls pushed in it, and its ball cells (T, balls, 2)."""
    ds = td.make_dataset("agent", 40, 32, 16, 0, "test")
    for i in range(40):
        item = ds[i]
        if (item["events"][:-1] == td.EVENTS.index("pushed")).sum() >= 2:
            return item["video"], item["states"][:, 1:]
    raise AssertionError("no clip with two pushes")


def test_pushed_ball_scores_count_arrivals_and_departures():
    """Against a plain loop over the states: a cell is an arrival at frame t when a ball is there
    and none was in the first frame, a departure the other way round. The truth scores 1 and 1,
    copy_last 0 and 0, black frames 0 and 1, frames with a ball in every cell 1 and 0. All balls
    are right in every frame of the truth, in a copy of the first frame where no ball has moved
    yet, in no frame of black or red ones."""
    video, balls = pushed_clip()
    last, truth = video[None, :1], video[None, 1:]
    horizon = 6

    def cells(t):
        return {(x, y) for x, y in balls[t].tolist() if x >= 0}

    arrivals = [len(cells(t) - cells(0)) for t in range(1, len(balls))]
    departures = [len(cells(0) - cells(t)) for t in range(1, len(balls))]
    assert 0 < sum(arrivals[:horizon]) < sum(arrivals) and sum(departures) == sum(arrivals)
    exact = wm.pushed_ball_scores(truth, last, truth, horizon)
    assert exact["pushed_ball_cells"] == sum(arrivals[:horizon])
    assert exact["pushed_ball_cells_rollout"] == sum(arrivals)
    assert exact["pushed_ball_arrived_rollout"] == 1 and exact["pushed_ball_left_rollout"] == 1
    assert exact["balls_exact"] == 1 and exact["balls_exact_rollout"] == 1
    copy = wm.pushed_ball_scores(last.expand_as(truth), last, truth, horizon)
    assert copy["pushed_ball_arrived_rollout"] == 0 and copy["pushed_ball_left_rollout"] == 0
    unmoved = [cells(t) == cells(0) for t in range(1, len(balls))]
    assert copy["balls_exact"] == pytest.approx(sum(unmoved[:horizon]) / horizon)
    assert copy["balls_exact_rollout"] == pytest.approx(sum(unmoved) / len(unmoved))
    black = wm.pushed_ball_scores(torch.zeros_like(truth), last, truth, horizon)
    assert black["pushed_ball_arrived"] == 0 and black["pushed_ball_left"] == 1
    assert black["balls_exact_rollout"] == 0
    red = torch.tensor(td.AGENT_BALL).view(1, 1, 3, 1, 1).expand_as(truth)
    full = wm.pushed_ball_scores(red, last, truth, horizon)
    assert full["pushed_ball_arrived"] == 1 and full["pushed_ball_left"] == 0
    assert full["balls_exact_rollout"] == 0
    half = torch.cat([truth[:, :horizon], last.expand(1, truth.shape[1] - horizon, -1, -1, -1)], 1)
    mixed = wm.pushed_ball_scores(half, last, truth, horizon)
    assert mixed["pushed_ball_arrived"] == 1
    right = horizon + sum(unmoved[horizon:])
    assert mixed["balls_exact"] == 1 and mixed["balls_exact_rollout"] < 1
    assert mixed["balls_exact_rollout"] == pytest.approx(right / len(unmoved))
    moved_later = sum(arrivals[horizon:])
    assert mixed["pushed_ball_arrived_rollout"] == pytest.approx(
        sum(arrivals[:horizon]) / (sum(arrivals[:horizon]) + moved_later)
    )


def test_fsq_bounds_rounds_and_passes_gradients_straight_through():
    """--fsq-levels 5: 2 tanh(z / 2) rounded, values -2..2 (hand-computed), gradient of the tanh
    alone; a latent on the grid is its own quantisation; 0 levels: identity."""
    model = wm.WorldModel(3, 4, 4, "gru", hidden=8, grid=4, window=3, fsq_levels=5)
    z = torch.tensor([-9.0, -1.2, -0.4, 0.3, 0.8, 1.6, 50.0], requires_grad=True)
    q = model.quantise(z)
    assert q.tolist() == [-2, -1, 0, 0, 1, 1, 2]
    q.sum().backward()
    assert torch.allclose(z.grad, 1 - torch.tanh(z.detach() / 2) ** 2)
    grid = torch.arange(-2.0, 3.0)
    assert torch.equal(model.quantise(grid), grid)
    plain = wm.WorldModel(3, 4, 4, "gru", hidden=8, grid=4, window=3)
    assert torch.equal(plain.quantise(z), z)


@pytest.mark.parametrize("dynamics", wm.DYNAMICS)
def test_fsq_latents_of_encoding_and_every_rollout_step_lie_on_the_grid(dynamics):
    torch.manual_seed(0)
    model = wm.WorldModel(
        3, 4, 4, dynamics, hidden=8, heads=2, grid=4, window=3, num_actions=A, fsq_levels=3
    )
    with torch.no_grad():
        for p in model.dynamics.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(2, 3, 3, 32, 32)
    with torch.no_grad():
        z = model.encode(x.flatten(0, 1))
        _, _, z_pred = model(x, 4, torch.randint(0, A, (2, 6)))
    for v in (z, z_pred):
        assert torch.equal(v, v.round()) and v.abs().max() <= 1
    assert z_pred.abs().sum() > 0


@pytest.mark.parametrize("dynamics", ["gru", "lstm"])
@pytest.mark.parametrize("kernel", [3, 5])
def test_input_kernel_sets_how_far_one_step_sees(dynamics, kernel):
    """One step from a zero state: the input convolution reaches kernel // 2 cells, the gate or
    candidate convolution one more, the output convolution one more; a change in one corner
    cell reaches exactly that far (Chebyshev distance)."""
    torch.manual_seed(0)
    model = wm.WorldModel(3, 4, 4, dynamics, hidden=8, grid=8, window=3, input_kernel=kernel)
    with torch.no_grad():
        for p in model.dynamics.parameters():
            p.add_(0.3 * torch.randn_like(p))
        z = torch.randn(1, 4, 8, 8)
        bumped = z.clone()
        bumped[0, :, 0, 0] += 1
        changed = (model.step(bumped, None)[0] - model.step(z, None)[0]).abs().amax((0, 1)) > 0
    reach = torch.arange(8)[:, None].maximum(torch.arange(8)[None])  # distance from (0, 0)
    assert torch.equal(changed, reach <= kernel // 2 + 2)


def test_fsq_and_kernel_flags_refuse_bad_values_and_other_checkpoints(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--fsq-levels 4: use 0"):
        run(tmp_path, "--fsq-levels", "4")
    with pytest.raises(SystemExit, match="--input-kernel 4: use an odd"):
        run(tmp_path, "--input-kernel", "4")
    with pytest.raises(SystemExit, match="trained with --fsq-levels 0, not 5"):
        run(tiny, "--eval-only", "--fsq-levels", "5")
    with pytest.raises(SystemExit, match="trained with --input-kernel 3, not 5"):
        run(tiny, "--eval-only", "--input-kernel", "5")


def test_checkpoint_from_before_fsq_and_kernel_flags_still_loads(tiny, tmp_path):
    ck = torch.load(tiny / "ckpt.pt", weights_only=True)
    del ck["arch"]["fsq_levels"], ck["arch"]["input_kernel"]
    torch.save(ck, tmp_path / "old.pt")
    run(tmp_path, "--eval-only", "--ckpt", str(tmp_path / "old.pt"))
    assert os.path.isfile(tmp_path / "metrics.json")
    with pytest.raises(SystemExit, match="trained with --fsq-levels 0, not 3"):
        run(tmp_path, "--eval-only", "--ckpt", str(tmp_path / "old.pt"), "--fsq-levels", "3")


def ref_window_rollout(model, z_context, steps, actions, window, reencode=False):
    """A plain loop: the first prediction reads the whole context from a zero state; each later
    one reads only the last `window` latents (with their actions) from a zero state, or carries
    the state when window is 0. reencode: each prediction is decoded to a frame in [0, 1] and
    encoded again (the model's fsq_levels are 0: no quantisation) before anything reads it."""
    emb = model.action_embed.weight[torch.where(actions < 0, A, actions)]

    def fed_back(z):
        if not reencode:
            return z
        frame = ((model.decoder(z) + 1) / 2).clamp(0, 1)
        return model.encoder(frame * 2 - 1)

    zs = list(z_context.unbind(1))
    T = len(zs)
    state = None
    for t in range(T):
        z, state = model.dynamics(zs[t].contiguous(), state, emb[:, t])
    zs.append(fed_back(z))
    for new in range(T + 1, T + steps):  # the frame predicted
        if window:
            state = None
        for i in range(new - window, new) if window else [new - 1]:
            z, state = model.dynamics(zs[i].contiguous(), state, emb[:, i])
        zs.append(fed_back(z))
    return torch.stack(zs[T:], 1)


@pytest.mark.parametrize("dynamics", ["gru", "lstm"])
@pytest.mark.parametrize("window", [1, 3])
def test_rollout_window_rebuilds_the_state_from_the_last_latents(dynamics, window):
    model = action_model(dynamics)
    z = torch.randn(2, 3, 4, 4, 4)
    actions = torch.randint(-1, A, (2, 8))
    with torch.no_grad():
        got = model.rollout(z, 6, actions, window)
        want = ref_window_rollout(model, z, 6, actions, window)
        carried = model.rollout(z, 6, actions)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[:, 0], carried[:, 0]) and not torch.allclose(got, carried)


@pytest.mark.parametrize("dynamics", ["gru", "lstm"])
@pytest.mark.parametrize("window", [0, 1, 3])
def test_reencode_feeds_each_predicted_frame_back(dynamics, window):
    """--reencode: every prediction, the first included, becomes the latent of its decoded frame
    before the next step reads it, with the state carried or rebuilt over the window alike."""
    model = action_model(dynamics)
    z = torch.randn(2, 3, 4, 4, 4)
    actions = torch.randint(-1, A, (2, 8))
    with torch.no_grad():
        got = model.rollout(z, 6, actions, window, reencode=True)
        want = ref_window_rollout(model, z, 6, actions, window, reencode=True)
        plain = model.rollout(z, 6, actions, window)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got[:, 0], plain[:, 0], atol=1e-3)


@pytest.mark.parametrize("flags", [["--rollout-window", "2"], ["--reencode"]])
def test_headless_play_feeds_back_as_rollout_does(tiny, capsys, flags):
    args = tyro.cli(
        wm.Args, args=[*TINY, "--out-dir", str(tiny), "--play-actions", "RRUULDN", *flags]
    )
    model = wm.WorldModel(**wm.model_arch(args, 3))
    model.load_state_dict(torch.load(tiny / "ckpt.pt", weights_only=True)["model"])
    model.eval()
    frames = wm.play_headless(model, args, torch.device("cpu"))
    item = td.make_dataset("agent", 1, 32, 3, 0, "test")[0]
    ctx = (item["video"] * 255).round() / 255
    actions = torch.cat([item["actions"][:2], torch.tensor([4, 4, 1, 1, 3, 2, 0])])[None]
    with torch.no_grad():
        _, pred, _ = model(ctx[None], 7, actions, args.rollout_window, args.reencode)
        _, carried, _ = model(ctx[None], 7, actions)
    assert torch.allclose(frames, pred[0].clamp(0, 1), atol=1e-5)
    assert not torch.allclose(frames, carried[0].clamp(0, 1), atol=1e-5)


def test_rollout_window_refuses_bad_values(tmp_path):
    with pytest.raises(SystemExit, match="--rollout-window 4: use 0, or 1 to --context"):
        run(tmp_path, "--rollout-window", "4")
    with pytest.raises(SystemExit, match="the transformer has its own window"):
        run(tmp_path, "--rollout-window", "2", "--dynamics", "transformer")


def test_training_steps_roll_out_with_the_window_and_without_reencode():
    """--rollout-window applies in training too, --reencode does not: train_step's loss is
    rollout_losses' with the window and on latents (computed on a copy before the update)."""
    import copy
    from contextlib import nullcontext

    model = action_model("gru").train()
    args = wm.Args(context=3, horizon=4, rollout_window=1, reencode=True)
    x = torch.rand(2, 7, 3, 32, 32)
    actions = torch.randint(0, A, (2, 7))
    before = copy.deepcopy(model)
    want = wm.rollout_losses(before, x, 4, args, nullcontext(), actions=actions)[1]
    carried = replace(args, rollout_window=0)
    carried = wm.rollout_losses(before, x, 4, carried, nullcontext(), actions=actions)[1]
    fed_back = wm.rollout_losses(before, x, 4, args, nullcontext(), actions=actions, reencode=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    got = wm.train_step(model, opt, scaler, x, 4, args, nullcontext(), actions)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, carried, atol=1e-6)
    assert not torch.allclose(got, fed_back[1], atol=1e-6)


def test_evaluation_scores_the_reencoded_rollout():
    """--reencode at evaluation: the validation loss is that of the rollout fed its frames."""
    from contextlib import nullcontext

    model = action_model("gru")
    args = wm.Args(context=3, horizon=4, rollout=4, reencode=True)
    clips = torch.randint(0, 256, (2, 7, 3, 32, 32), dtype=torch.uint8)
    actions = torch.randint(0, A, (2, 7))
    x = clips.float() / 255
    _, _, val, _, _ = wm.evaluate(
        model, clips, args, torch.device("cpu"), nullcontext(), actions=actions
    )
    with torch.no_grad():
        fed_back = wm.rollout_losses(
            model, x, 4, args, nullcontext(), actions=actions, reencode=True
        )
        plain = wm.rollout_losses(model, x, 4, args, nullcontext(), actions=actions)
    assert val["loss"] == pytest.approx(float(fed_back[0]), rel=1e-5)
    assert val["loss"] != pytest.approx(float(plain[0]), rel=1e-3)
