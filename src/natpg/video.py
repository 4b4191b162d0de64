"""Record a trained agent's episodes to a video file (MP4 and the other ffmpeg containers, or GIF).

Frames are streamed to the encoder as the episode runs, so a long episode never sits in memory (GIF
excepted: Pillow assembles the whole animation before writing it). The episodes are those of
``natpg.evaluate`` with the same ``seed``: episode i starts from a reset seeded ``seed + i``, actions are
the policy's mode unless ``deterministic=False``, normalisation is frozen; with deterministic actions the
returns equal ``evaluate``'s episode for episode.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np

from .agent import Agent
from .evaluation import (check_evaluation, episode_generators, evaluation_env_kwargs, nonfinite_steps,
                         warn_cut_episodes, warn_dropped_episodes)
from .config import EVAL_MAX_EPISODE_STEPS, is_path
from .envs import make_env
from .errors import first_line, install_hint

FFMPEG_FORMATS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
VIDEO_FORMATS = FFMPEG_FORMATS + (".gif",)
# A frame every k-th step, k = ⌈render_fps / MAX_FPS⌉, played at render_fps / k: real time, and k times less rendering
# (MuJoCo renders in software on a machine without a GPU, ≈ 0.1 s a 480×480 frame on 2 cores); GIF players also
# slow down frames shorter than 20 ms.
MAX_FPS = 30


class RenderError(RuntimeError):
    """The environment could not render frames (no ``rgb_array`` mode, or no OpenGL context on this machine)."""


def _check_path(path: str | os.PathLike) -> Path:
    if not is_path(path):
        raise ValueError(f"video file must be a path such as 'run.gif' or 'run.mp4', got {path!r}")
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"video file {str(out)!r} is a directory")
    if out.suffix.lower() not in VIDEO_FORMATS:
        raise ValueError(f"video file {str(out)!r} must end in one of {', '.join(VIDEO_FORMATS)}")
    needs = ["imageio", "imageio_ffmpeg"] if out.suffix.lower() in FFMPEG_FORMATS else ["imageio"]
    for module in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ImportError(f"writing {out.suffix} video needs {module.replace('_', '-')}: "
                              f"{install_hint('video')}") from None
    return out


def _writer(path: Path, fps: float):
    import imageio.v2 as imageio

    if path.suffix.lower() == ".gif":
        return imageio.get_writer(path, mode="I", duration=1000.0 / fps, loop=0)
    # macro_block_size 2: the yuv420p encoders need even sides, and larger blocks would rescale MuJoCo's frames.
    return imageio.get_writer(path, fps=fps, macro_block_size=2)


def _render(env, env_id: str) -> np.ndarray:
    try:
        frame = env.render()
    except gym.error.DependencyNotInstalled as exc:
        raise RenderError(f"environment {env_id!r} needs an optional dependency to render: {exc}. natpg's "
                          f"[video] extra installs it for the classic-control tasks: {install_hint('video')}") from None
    except Exception as exc:  # the OpenGL back end fails in many ways; report it once, with the usual fix
        raise RenderError(f"environment {env_id!r} could not render a frame ({type(exc).__name__}: "
                          f"{first_line(exc)}). On a machine without a display, "
                          f"MuJoCo needs MUJOCO_GL=egl (or osmesa) in the environment before natpg is imported; "
                          f"`natpg eval --video` sets it itself.") from exc
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise RenderError(f"environment {env_id!r} rendered {type(frame).__name__} "
                          f"{getattr(frame, 'shape', '')}, not an RGB frame [H, W, 3]")
    return frame


def _builds_without_render_mode(env_id: str, action_mask, env_kwargs: dict) -> bool:
    """Whether ``env_id`` builds without ``render_mode``: then a TypeError with it came from that keyword
    (Gymnasium passes it to the constructor, and a plain ``__init__(self)`` rejects it)."""
    try:
        make_env(env_id, action_mask, env_kwargs=env_kwargs).close()
    except Exception:
        return False
    return True


def headless_linux() -> bool:
    """Linux without a display, where no window can open: frames are drawn off-screen (MuJoCo through EGL, pygame
    with SDL's dummy driver). Elsewhere (macOS, Windows: no DISPLAY variable, yet a screen) nothing is set."""
    return sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def record_video(agent: Agent, path: str | os.PathLike, env: str | None = None, episodes: int = 1,
                 seed: int = 123, deterministic: bool = True, max_episode_steps: int = EVAL_MAX_EPISODE_STEPS,
                 env_kwargs: dict | None = None) -> list[float]:
    """Play ``episodes`` episodes of ``agent`` on ``env`` (default: its own) and write them, back to back, to
    ``path`` (.mp4/.mkv/.webm/.avi/.mov through ffmpeg, or .gif; needs natpg's ``[video]`` extra). Returns each
    episode's undiscounted return. The file appears only when complete (written beside it, then renamed).
    An episode not ended after ``max_episode_steps`` steps is cut there, with a warning, as in ``evaluate``."""
    out = _check_path(path)
    with _windowless_pygame():
        return _record(agent, out, env, episodes, seed, deterministic, max_episode_steps, env_kwargs)


@contextlib.contextmanager
def _windowless_pygame():
    """pygame (classic control) draws without a window on a display-less Linux; the caller's environment variables
    are as they were afterwards."""
    if not headless_linux() or "SDL_VIDEODRIVER" in os.environ:
        yield
        return
    os.environ["SDL_VIDEODRIVER"] = "dummy"
    try:
        yield
    finally:
        os.environ.pop("SDL_VIDEODRIVER", None)


def _record(agent: Agent, out: Path, env: str | None, episodes: int, seed: int, deterministic: bool,
            max_episode_steps: int, env_kwargs: dict | None) -> list[float]:
    env_id = check_evaluation(agent, env, episodes, seed, max_episode_steps, env_kwargs, deterministic)
    env_kwargs = evaluation_env_kwargs(agent, env_id, env_kwargs)
    episodes, seed, max_episode_steps = int(episodes), int(seed), int(max_episode_steps)  # numpy's too
    with warnings.catch_warnings():  # an environment without rgb_array gets the clearer error below
        warnings.filterwarnings("ignore", message=".*render_mode.*not in the possible render_modes")
        try:
            rendered = make_env(env_id, agent.action_mask_source, env_kwargs=env_kwargs, render_mode="rgb_array")
        except TypeError as exc:
            if not _builds_without_render_mode(env_id, agent.action_mask_source, env_kwargs):
                raise  # the constructor fails anyway: not a rendering problem
            raise RenderError(f"environment {env_id!r} cannot render frames: its constructor does not take "
                              f"render_mode ({first_line(exc)}). An environment that renders takes "
                              f"render_mode='rgb_array' and lists it in metadata['render_modes']") from None
    tmp_name = None
    try:
        if "rgb_array" not in rendered.metadata.get("render_modes", []):
            raise RenderError(f"environment {env_id!r} cannot render frames: its render modes are "
                              f"{rendered.metadata.get('render_modes', [])}, not 'rgb_array'")
        fps = float(rendered.metadata.get("render_fps") or 30)
        frame_every = math.ceil(fps / MAX_FPS)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_name = str(out.with_name(f".{out.stem}.{os.getpid()}.part{out.suffix}"))  # the encoder reads the suffix
        try:  # a GIF is written when closed: a folder that takes no file fails now, not after every episode
            open(tmp_name, "wb").close()
        except OSError as exc:
            raise OSError(f"cannot write the video file {str(out)!r}: {exc.strerror or exc}") from None
        returns, cut = [], 0
        writer = _writer(Path(tmp_name), fps / frame_every)
        try:
            drop, dropped = agent.config.env.nonfinite_env == "drop", 0
            for i in range(episodes):
                obs, _ = rendered.reset(seed=seed + i)
                flat = np.asarray(obs, np.float64).reshape(1, -1)
                nonfinite_steps(env_id, flat, np.zeros(1), np.ones(1, bool), 0, False, i)  # as evaluate's
                draws = None if deterministic else episode_generators(seed + i, 1)  # evaluation episode i's draws
                total, t, done = 0.0, 0, False
                while True:
                    if t % frame_every == 0:
                        writer.append_data(_render(rendered, env_id)[..., :3])
                    if done or t == max_episode_steps:
                        cut += not done
                        break
                    obs, rew, term, trunc, _ = rendered.step(agent._act(flat, deterministic, draws)[0])
                    t += 1
                    flat = np.asarray(obs, np.float64).reshape(1, -1)
                    if nonfinite_steps(env_id, flat, np.array([rew]), np.ones(1, bool), t, drop, i).any():
                        dropped += 1  # the episode ends at its last finite observation, as in evaluate
                        break
                    total += float(rew)
                    done = bool(term or trunc)
                returns.append(total)
        finally:
            writer.close()
        os.replace(tmp_name, out)
        tmp_name = None
        warn_cut_episodes(env_id, cut, episodes, max_episode_steps)
        warn_dropped_episodes(env_id, dropped, episodes)
        return returns
    finally:
        rendered.close()
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
