"""Single-line breaks of toy_data.py's splits, held-out digits and data kinds; each must fail a
test of tests/test_toy_data.py (run: python tests/mutants/run.py toy_data)."""

TESTS = ["tests/test_toy_data.py"]

MUTANTS = [
    {
        "name": "position_train_overlaps_val",
        "invariant": "the train block of an ordinary file ends where the val block starts",
        "old": '"train": (0, n - 2 * k), "val"',
        "new": '"train": (0, n - k), "val"',
    },
    {
        "name": "position_val_overlaps_test",
        "invariant": "the val block of an ordinary file ends where the test block starts",
        "old": '"val": (n - 2 * k, n - k), "test"',
        "new": '"val": (n - 2 * k, n), "test"',
    },
    {
        "name": "position_no_minimum",
        "invariant": "from 3 videos, val and test get at least one video each",
        "old": "    k = max(1, n // 10)",
        "new": "    k = n // 10",
    },
    {
        "name": "position_offset_ignored",
        "invariant": "a split's item i is video start + i of the file",
        "old": "        j = self.start + i % self.n",
        "new": "        j = i % self.n",
    },
    {
        "name": "time_first_file_not_held_out",
        "invariant": "a time-first .npy (mnist_test_seq.npy) is a test set",
        "old": 'arrays["videos"].ndim == 4:\n        return "test"',
        "new": 'arrays["videos"].ndim == 4:\n        return None',
    },
    {
        "name": "recorded_split_ignored",
        "invariant": "an .npz written with --split test serves the test split only",
        "old": '    return recorded if recorded in ("val", "test") else None',
        "new": "    return None",
    },
    {
        "name": "held_out_file_trainable",
        "invariant": "asking a held-out file for another split stops",
        "old": "    if held and not whole and held != split:",
        "new": "    if held and whole and held != split:",
    },
    {
        "name": "held_out_file_split_again",
        "invariant": "a held-out file is served whole, not split by position",
        "old": "    return (0, n) if whole or held else position_range(n, split)",
        "new": "    return (0, n) if whole else position_range(n, split)",
    },
    {
        "name": "split_file_of_another_split",
        "invariant": "a folder's val.npz must not record another split",
        "old": "    if whole and recorded not in (None, split):",
        "new": '    if whole and recorded not in (None, split, "test"):',
    },
    {
        "name": "mnist_val_is_test",
        "invariant": "real MNIST val and test digits are different official test images",
        "old": '[split == "test" :: 2]',
        "new": "[::2]",
    },
    {
        "name": "font_val_jitter_of_test",
        "invariant": "val glyphs have their own jitter draws (none shared with test)",
        "old": '{"train": 1, "val": 2, "test": 0}[split]',
        "new": '{"train": 1, "val": 0, "test": 0}[split]',
    },
    {
        "name": "font_val_training_typefaces",
        "invariant": "val digits are drawn from the held-out typefaces",
        "old": '    train = _need(split, SPLITS, "split") == "train"',
        "new": '    train = _need(split, SPLITS, "split") != "test"',
    },
    {
        "name": "moving_mnist_val_from_train_pool",
        "invariant": "a val clip's digits come from the val pool",
        "old": "        pool = digit_pool(SPLITS[self.split_id], self.path, ds)",
        "new": '        pool = digit_pool("train" if self.split_id < 2 else "test", self.path, ds)',
    },
    {
        "name": "single_idx_file_for_held_out",
        "invariant": "one IDX file never gives held-out digits (it would repeat training digits)",
        "old": '(not train or "t10k" in os.path.basename(path))',
        "new": '("t10k" in os.path.basename(path))',
    },
    {
        "name": "data_dir_ignored",
        "invariant": "a --data-dir with the default kind implies its own kind",
        "old": "    if kind == default:\n        return implied_kind(data_dir)",
        "new": "    if kind == default:\n        return kind",
    },
    {
        "name": "mnist_npz_read_as_videos",
        "invariant": "an .npz holding x_train is MNIST digits (moving_mnist)",
        "old": 'return "moving_mnist" if "x_train" in z.files else "npz"',
        "new": 'return "npz"',
    },
    {
        "name": "split_folder_read_as_videos",
        "invariant": "a folder of train.npz / val.npz / test.npz is npz",
        "old": '        if any(f"{s}.npz" in names for s in SPLITS):\n            return "npz"',
        "new": '        if any(f"{s}.npz" in names for s in SPLITS):\n            return "folder"',
    },
    {
        "name": "file_kind_reinferred",
        "invariant": "a kind that reads files keeps its --data-dir as given",
        "old": "    if data_dir is None or kind in FILE_KINDS:",
        "new": "    if data_dir is None:",
    },
    {
        "name": "cli_split_not_recorded",
        "invariant": "an .npz written from the test split records it",
        "old": '"split": np.array(split)}',
        "new": '"split": np.array("train")}',
    },
    {
        "name": "cli_npy_not_time_first",
        "invariant": "the .npy the CLI writes is time first (T, N, H, W)",
        "old": "    np.save(path, videos[:, :, 0].transpose(1, 0, 2, 3))",
        "new": "    np.save(path, videos[:, :, 0])",
    },
    {
        "name": "cli_npy_of_training_clips",
        "invariant": "the test layout is written from the test split only",
        "old": '    if videos.shape[2] != 1 or split != "test":',
        "new": "    if videos.shape[2] != 1:",
    },
    # ---- steady clips
    {
        "name": "steady_speed_of_the_clip_length",
        "invariant": "steady shapes move at the speed of a `steady`-frame crossing at any length",
        "old": "    speed = rng.uniform(0.6, 1.0) * (hi - lo) / (steady - 1)",
        "new": "    speed = rng.uniform(0.6, 1.0) * (hi - lo) / (t - 1)",
    },
    {
        "name": "steady_direction_ignored",
        "invariant": "steady shapes move the prompted way",
        "old": "    return np.mod(start + np.sign(d) * speed * np.arange(t), n).astype(np.float32)",
        "new": "    return np.mod(start + speed * np.arange(t), n).astype(np.float32)",
    },
    {
        "name": "steady_no_wrapped_copy",
        "invariant": "a shape leaving one side enters the other (never out of sight)",
        "old": "            for ox in ((-w, 0, w) if dx else (0,))",
        "new": "            for ox in ((0,) if dx else (0,))",
    },
    {
        "name": "steady_rotation_not_upright",
        "invariant": "steady rotating shapes are upright at frame 0",
        "old": "sign * STEADY_TURN * np.arange(t), h, w)",
        "new": "sign * STEADY_TURN * np.arange(1, t + 1), h, w)",
    },
    {
        "name": "steady_rotation_one_way",
        "invariant": "steady rotation turns the prompted way",
        "old": "sign * STEADY_TURN * np.arange(t), h, w)",
        "new": "STEADY_TURN * np.arange(t), h, w)",
    },
    {
        "name": "steady_gradient_sawtooth",
        "invariant": "a steady gradient goes back the way it came (triangle wave)",
        "old": "    q = np.mod(np.arange(t) / (steady - 1), 2)",
        "new": "    q = np.mod(np.arange(t) / (steady - 1), 1)",
    },
    {
        "name": "agent_push_leaves_ball",
        "invariant": "a push moves the ball one cell",
        "old": "            self.balls[self.balls.index(to)] = behind",
        "new": "            self.balls[self.balls.index(to)] = to",
    },
    {
        "name": "agent_walks_through_walls",
        "invariant": "walls block the agent",
        "old": "        if self.walls[to[1], to[0]]:\n            return 2",
        "new": "        if False:\n            return 2",
    },
    {
        "name": "agent_pushes_ball_into_ball",
        "invariant": "a ball with a ball behind it blocks the push",
        "old": "            if self.walls[behind[1], behind[0]] or behind in self.balls:",
        "new": "            if self.walls[behind[1], behind[0]]:",
    },
    {
        "name": "agent_up_is_down",
        "invariant": "up moves the agent one row up (y points down)",
        "old": "MOVES = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))",
        "new": "MOVES = ((0, 0), (0, 1), (0, -1), (-1, 0), (1, 0))",
    },
    {
        "name": "agent_states_one_frame_late",
        "invariant": "states[t] is the room of frame t (actions[t] shows in frame t + 1)",
        "old": '            "states": torch.from_numpy(states[:-1]),',
        "new": '            "states": torch.from_numpy(states[1:]),',
    },
    {
        "name": "agent_cells_off_by_half",
        "invariant": "the centroid of a simulated agent is its cell exactly",
        "old": "    x = (w * xs).sum((-2, -1)) / mass.clamp(min=1e-6) - 0.5",
        "new": "    x = (w * xs).sum((-2, -1)) / mass.clamp(min=1e-6)",
    },
    {
        "name": "agent_lost_scores_zero",
        "invariant": "a lost agent counts as the room's size, never as a hit",
        "old": "    return torch.where(lost, float(grid), err), torch.where(lost, 0.0, hit)",
        "new": "    return torch.where(lost, 0.0, err), torch.where(lost, 0.0, hit)",
    },
    {
        "name": "folder_actions_wrong_length_accepted",
        "invariant": "an actions file has one action per frame, or one fewer",
        "old": "    if len(ids) not in (num_frames, num_frames - 1):",
        "new": "    if len(ids) > num_frames:",
    },
    {
        "name": "folder_actions_any_id",
        "invariant": "an action id outside 0..4 (other than -1) is refused",
        "old": "-1 <= int(word) < len(ACTIONS)",
        "new": "-1 <= int(word)",
    },
]
