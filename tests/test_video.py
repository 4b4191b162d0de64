"""natpg.record_video / natpg eval --video: the recorded episodes are evaluate's, every frame is written, and a
failure leaves no file behind (and never touches an existing one)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest

import natpg
from natpg.cli import main as cli
from natpg.video import MAX_FPS, RenderError, record_video


class FrameEnv(gym.Env):
    """Ten steps of a 1-D walk whose frame is a solid colour; rendering fails at step ``fail_at`` (if given)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 90}
    observation_space = gym.spaces.Box(-10.0, 10.0, (1,))
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None, fail_at=None, nan_at=None, nan_seed=None):
        self.render_mode, self.fail_at, self.nan_at, self.nan_seed, self.t = render_mode, fail_at, nan_at, nan_seed, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.nan_here = 0, self.nan_seed in (None, seed)  # NaN in every episode, or the one reset with nan_seed
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        nan = self.t == self.nan_at and self.nan_here
        return np.full(1, np.nan if nan else self.t, np.float32), float(action), False, self.t >= 10, {}

    def render(self):
        if self.fail_at is not None and self.t >= self.fail_at:
            raise RuntimeError("the renderer broke")
        return np.full((16, 24, 3), 10 * self.t, np.uint8)


class NoRenderEnv(FrameEnv):
    metadata = {"render_modes": []}


class EndlessEnv(FrameEnv):
    """Pays 1 a step and never ends: registered without a time limit, as a user's environment may be."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}  # every step a frame

    def step(self, action):
        self.t += 1
        return np.full(1, self.t, np.float32), 1.0, False, False, {}


class PlainEnv(gym.Env):
    """A user's environment in its simplest form: ``__init__(self)``, no ``render_mode``, no metadata."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 1.0, False, True, {}


class BrokenPlainEnv(PlainEnv):
    def __init__(self, size):  # needs an argument it is not given: a TypeError with or without render_mode
        self.size = size


for _id, _kwargs, _entry in [("natpg_test/Frames-v0", {}, FrameEnv),
                             ("natpg_test/Plain-v0", {}, PlainEnv),
                             ("natpg_test/BrokenFrames-v0", {"fail_at": 3}, FrameEnv),
                             ("natpg_test/NaNFrames-v0", {"nan_at": 4}, FrameEnv),
                             ("natpg_test/NaNFramesSeed9-v0", {"nan_at": 4, "nan_seed": 9}, FrameEnv),
                             ("natpg_test/NoFrames-v0", {}, NoRenderEnv),
                             ("natpg_test/Endless-v0", {}, EndlessEnv)]:
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, kwargs=_kwargs)


def test_cartpole_video_has_evaluates_returns_and_every_kth_frame(tmp_path, monkeypatch):
    agent = natpg.NPG("CartPole-v1", seed=0)  # untrained: episodes of different lengths
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    environ = dict(os.environ)
    returns = record_video(agent, tmp_path / "sub" / "cartpole.mp4", episodes=3, seed=7)
    assert dict(os.environ) == environ  # drawn without a window where there is no display, the caller's env as it was
    mean, std = natpg.evaluate(agent, episodes=3, seed=7)
    assert len(returns) == 3
    assert np.mean(returns) == pytest.approx(mean, abs=1e-9) and np.std(returns) == pytest.approx(std, abs=1e-9)
    frames = iio.imread(tmp_path / "sub" / "cartpole.mp4")
    k = math.ceil(50 / MAX_FPS)  # CartPole renders at 50 fps
    # An episode of T steps (CartPole pays 1 a step, so T = its return) has frames at t = 0, k, 2k, … ≤ T.
    assert frames.shape == (sum(int(r) // k + 1 for r in returns), 400, 600, 3)
    assert iio.immeta(tmp_path / "sub" / "cartpole.mp4")["fps"] == pytest.approx(50 / k)
    assert sorted(os.listdir(tmp_path / "sub")) == ["cartpole.mp4"]  # no temporary file left


def test_a_stochastic_video_plays_the_stochastic_evaluations_episodes(tmp_path):
    agent = natpg.NPG("natpg_test/Frames-v0", seed=0)  # pays the action (0 or 1) for ten steps
    returns = record_video(agent, tmp_path / "p.gif", episodes=4, seed=7, deterministic=False)
    assert returns == natpg.evaluation.evaluation_episodes(agent, episodes=4, seed=7, deterministic=False)["return"].tolist()
    assert len(set(returns) - {0.0, 10.0}) > 0  # sampled: not all one action, as the mode's


def test_a_video_treats_a_non_finite_observation_as_the_evaluation_does(tmp_path):
    """An error naming the step, no file; under nonfinite_env='drop' the episodes end before it, with evaluate's
    returns and warning."""
    agent = natpg.NPG("natpg_test/NaNFrames-v0", seed=0)
    with pytest.raises(natpg.NonFiniteEnvError, match=r"step 4 of evaluation episode"):
        record_video(agent, tmp_path / "v.gif", episodes=2)
    assert not os.listdir(tmp_path)
    third = natpg.NPG("natpg_test/NaNFramesSeed9-v0", seed=0)  # NaN in the episode reset with seed 9: the third
    for play in (natpg.evaluate, lambda *a, **k: record_video(a[0], tmp_path / "v.gif", **k)):
        with pytest.raises(natpg.NonFiniteEnvError, match=r"step 4 of evaluation episode\(s\) \[2\]"):
            play(third, episodes=4, seed=7)
    dropping = natpg.NPG("natpg_test/NaNFrames-v0", seed=0, nonfinite_env="drop")
    with pytest.warns(RuntimeWarning, match="2 of 2 evaluation episodes .* ended at a non-finite"):
        returns = record_video(dropping, tmp_path / "v.gif", episodes=2, deterministic=False)
    with pytest.warns(RuntimeWarning, match="2 of 2 evaluation episodes .* ended at a non-finite"):
        evaluation = natpg.evaluation.evaluation_episodes(dropping, episodes=2, deterministic=False)
    assert returns == evaluation["return"].tolist() and evaluation["length"].tolist() == [3, 3]
    assert len(iio.imread(tmp_path / "v.gif")) == 2 * 2  # frames at t = 0 and 3 of each (k = 3)


def test_an_evaluation_in_turns_names_its_episodes_and_counts_them_across_turns(monkeypatch):
    """EVAL_CHUNK = 2: episode 2 (reset with seed 9) is the first of the second turn, named as episode 2; the
    warnings count every turn's episodes."""
    monkeypatch.setattr(natpg.evaluation, "EVAL_CHUNK", 2)
    third = natpg.NPG("natpg_test/NaNFramesSeed9-v0", seed=0)
    with pytest.raises(natpg.NonFiniteEnvError, match=r"step 4 of evaluation episode\(s\) \[2\]"):
        natpg.evaluate(third, episodes=5, seed=7)
    dropping = natpg.NPG("natpg_test/NaNFramesSeed9-v0", seed=0, nonfinite_env="drop")
    with pytest.warns(RuntimeWarning, match="1 of 5 evaluation episodes .* ended at a non-finite"):
        out = natpg.evaluation.evaluation_episodes(dropping, episodes=5, seed=7)
    assert out["length"].tolist() == [10, 10, 3, 10, 10]
    endless = natpg.NPG("natpg_test/Endless-v0", seed=0)
    with pytest.warns(RuntimeWarning, match=r"5 of 5 evaluation episodes .* had not ended after max_episode_steps=3"):
        natpg.evaluate(endless, episodes=5, max_episode_steps=3)


def test_gif_frames_and_timing(tmp_path):
    agent = natpg.NPG("natpg_test/Frames-v0", seed=0)
    returns = record_video(agent, tmp_path / "walk.gif", episodes=2, seed=0)
    assert len(returns) == 2
    frames = iio.imread(tmp_path / "walk.gif")
    k = math.ceil(90 / MAX_FPS)  # 3: frames at t = 0, 3, 6, 9 of each 10-step episode
    assert frames.shape[0] == 2 * 4
    assert [int(f[0, 0, 0]) for f in frames] == [0, 30, 60, 90] * 2
    assert iio.immeta(tmp_path / "walk.gif", index=0)["duration"] == pytest.approx(1000 * k / 90, abs=10)


def test_failure_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    agent = natpg.NPG("natpg_test/BrokenFrames-v0", seed=0)
    target = tmp_path / "walk.mp4"
    with pytest.raises(RenderError, match="could not render a frame .*the renderer broke"):
        record_video(agent, target)
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"an earlier video")
    with pytest.raises(RenderError):
        record_video(agent, target)
    assert target.read_bytes() == b"an earlier video" and os.listdir(tmp_path) == ["walk.mp4"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new file on Linux alone")
@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_a_folder_that_takes_no_file_fails_before_any_frame_is_rendered(monkeypatch, suffix):
    """A GIF is only written when closed: without a first write the failure came after every episode was played,
    followed by the writer's own tracebacks from its __del__."""
    import natpg.video

    rendered = []
    monkeypatch.setattr(natpg.video, "_render", lambda env, env_id: rendered.append(1) or env.render())
    agent = natpg.NPG("natpg_test/Frames-v0", seed=0)
    with pytest.raises(OSError, match=rf"cannot write the video file '/proc/walk{suffix}': No such file or directory"):
        record_video(agent, f"/proc/walk{suffix}")
    assert rendered == []


def test_bad_requests_are_refused_before_any_work(tmp_path):
    agent = natpg.NPG("natpg_test/Frames-v0", seed=0)
    with pytest.raises(ValueError, match=r"must end in one of \.mp4"):
        record_video(agent, tmp_path / "walk.txt")
    with pytest.raises(ValueError, match="episodes must be an integer"):
        record_video(agent, tmp_path / "walk.gif", episodes=0)
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        record_video(agent, tmp_path / "dir.mp4")
    with pytest.raises(ValueError, match="does not match the agent"):
        record_video(agent, tmp_path / "walk.gif", env="CartPole-v1")
    with pytest.raises(RenderError, match="cannot render frames: its render modes are \\[\\]"):
        record_video(natpg.NPG("natpg_test/NoFrames-v0", seed=0), tmp_path / "walk.gif")
    assert os.listdir(tmp_path) == ["dir.mp4"]


@pytest.mark.parametrize("missing,suffix", [("imageio", ".gif"), ("imageio", ".mp4"), ("imageio_ffmpeg", ".mp4")])
def test_a_missing_video_dependency_names_the_extra_before_any_work(tmp_path, monkeypatch, missing, suffix):
    """A GIF needs imageio too (the README once said Pillow alone): each missing module is named, with natpg's
    [video] extra and how to install it from the source directory."""
    agent = natpg.NPG("natpg_test/Frames-v0", seed=0)
    monkeypatch.setitem(sys.modules, missing, None)  # import → ImportError
    with pytest.raises(ImportError, match=rf"writing \{suffix} video needs {missing.replace('_', '-')}: "
                                          r"pip install -e \"\.\[video\]\" in natpg's source directory"):
        record_video(agent, tmp_path / f"walk{suffix}")
    assert os.listdir(tmp_path) == []


def test_env_without_render_mode_is_a_render_error(tmp_path, capsys):
    """Gymnasium passes render_mode to the constructor; a plain ``__init__(self)`` rejects it with a TypeError."""
    agent = natpg.NPG("natpg_test/Plain-v0", seed=0)
    with pytest.raises(RenderError, match="'natpg_test/Plain-v0' cannot render frames: its constructor does not take "
                                          "render_mode .*takes no arguments"):
        record_video(agent, tmp_path / "plain.gif")
    agent.save(tmp_path / "run")
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "run"), "--episodes", "1", "--video", str(tmp_path / "plain.gif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("natpg eval: error: ") and "does not take render_mode" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_constructor_that_fails_anyway_is_not_called_a_render_error(tmp_path, monkeypatch):
    """The TypeError is the environment's own when it is raised without render_mode too: it is left as it is."""
    import natpg.video

    agent = natpg.NPG("natpg_test/Plain-v0", seed=0)
    gym.register(id="natpg_test/BrokenPlain-v0", entry_point=BrokenPlainEnv)
    try:
        monkeypatch.setattr(natpg.video, "check_evaluation", lambda *a: "natpg_test/BrokenPlain-v0")
        with pytest.raises(TypeError, match="raised from the environment creator for natpg_test/BrokenPlain-v0"):
            record_video(agent, tmp_path / "plain.gif")
    finally:
        del gym.registry["natpg_test/BrokenPlain-v0"]


def test_evaluation_cuts_an_episode_that_never_ends_and_says_so(tmp_path, capsys):
    agent = natpg.NPG("natpg_test/Endless-v0", seed=0)
    with pytest.warns(RuntimeWarning, match=r"3 of 3 evaluation episodes .* had not ended after max_episode_steps=40"):
        assert natpg.evaluate(agent, episodes=3, max_episode_steps=40) == (40.0, 0.0)
    with pytest.warns(RuntimeWarning, match=r"2 of 2 evaluation episodes"):
        assert natpg.record_video(agent, tmp_path / "endless.gif", episodes=2, max_episode_steps=25) == [25.0, 25.0]
    assert iio.imread(tmp_path / "endless.gif").shape[0] == 2 * 26  # frames at t = 0 … 25 of each episode
    cart = natpg.NPG("CartPole-v1", seed=0)  # episodes the environment ends: no warning, same returns as before
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert natpg.evaluate(cart, episodes=2, max_episode_steps=500) == natpg.evaluate(cart, episodes=2)
    agent.save(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="had not ended"):
        assert cli(["eval", str(tmp_path / "run"), "--episodes", "1", "--max-episode-steps", "30", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["return_mean"] == 30.0


def test_cli_records_mujoco_headless(tmp_path):
    """natpg eval --video on a MuJoCo task in a fresh process with no display: the CLI picks EGL itself."""
    agent = natpg.NPG("Hopper-v5", seed=0)
    agent.save(str(tmp_path / "hopper"))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL")}
    out = subprocess.run([sys.executable, "-m", "natpg.cli", "eval", str(tmp_path / "hopper"), "--episodes", "1",
                          "--seed", "3", "--video", str(tmp_path / "hopper.mp4"), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    mean, _ = natpg.evaluate(agent, episodes=1, seed=3)
    assert result["return_mean"] == pytest.approx(mean, abs=1e-9) and result["video"] == str(tmp_path / "hopper.mp4")
    frames = iio.imread(tmp_path / "hopper.mp4")
    assert frames.shape[1:] == (480, 480, 3) and frames.shape[0] >= 2
    assert frames.std() > 1.0  # a rendered scene, not a blank frame
