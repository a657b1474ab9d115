"""Run episodes of a policy (scripted expert, random, later learned) on a task and summarise them.

Used by `robot-rl sim rollout`, `make demo` and the benchmarks. Each episode i uses seed + i, so
two policies evaluated with the same seed see the same initial states (paired comparison).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robot_rl.stats import wilson_interval

Policy = Callable[[dict], np.ndarray]


def policy_rng(episode_seed: int) -> np.random.Generator:
    """The policy's own random stream for an episode (sampling noise), apart from the env's: the
    in-process rollout and the policy server draw it the same way, so their rollouts match."""
    return np.random.default_rng(episode_seed + 1_000_003)


@dataclass
class RolloutSummary:
    task: str
    policy: str
    episodes: int = 0
    successes: int = 0
    failures: int = 0  # ended by the task's failure condition (touched the post, dropped the peg...)
    steps: int = 0
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)
    solutions: Counter = field(default_factory=Counter)
    video: str | None = None
    per_episode: list[bool] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.successes / max(1, self.episodes)

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)

    @property
    def steps_per_s(self) -> float:
        return self.steps / max(1e-9, self.seconds)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci95
        return {"task": self.task, "policy": self.policy, "episodes": self.episodes, "successes": self.successes,
                "failures": self.failures, "success_rate": self.success_rate, "ci95": [lo, hi],
                "mean_length": float(np.mean(self.lengths or [0])), "steps_per_s": self.steps_per_s,
                "solutions": dict(self.solutions), "video": self.video}


def make_policy(kind: str, env, seed: int):
    """(reset(rng), act(obs)) for `scripted` or `random`."""
    if kind == "scripted":
        from robot_rl.sim import make_expert

        return make_expert(env)
    if kind == "random":
        return RandomPolicy(env)
    raise ValueError(f"policy '{kind}' is not one of: scripted, random")


class RandomPolicy:
    def __init__(self, env):
        self.space = env.action_space

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, obs: dict) -> np.ndarray:
        return self.rng.uniform(self.space.low, self.space.high).astype(np.float32)


def run_episodes(env, policy, episodes: int, seed: int, task: str, policy_name: str,
                 video_path: str | Path | None = None, progress: bool = True,
                 recorder: EpisodeRecorder | None = None) -> RolloutSummary:
    """Roll out `episodes` episodes; the first one is rendered to `video_path` (GIF/MP4) if given;
    every episode is written to `recorder`'s store if given."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    summary = RolloutSummary(task=task, policy=policy_name)
    frames: list[np.ndarray] = []
    cols = (TextColumn(f"[bold]{task}[/] {policy_name}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*cols, disable=not progress, transient=False) as bar:
        tid = bar.add_task("episodes", total=episodes, rate="")
        t0 = time.perf_counter()
        for ep in range(episodes):
            ep_seed = seed + ep
            obs, info = env.reset(seed=ep_seed)
            if hasattr(policy, "begin"):  # a policy that needs the episode's seed (the scripted operator's path)
                policy.begin(ep_seed)
            policy.reset(policy_rng(ep_seed))
            record = video_path is not None and ep == 0
            if record:
                frames.append(env.render())
            length = 0
            if recorder is not None:
                recorder.begin(env, ep_seed)
            while True:
                action = policy.act(obs)
                stamp = sim_time(env)
                next_obs, reward, terminated, truncated, info = env.step(action)
                if recorder is not None:
                    recorder.step(obs, action, stamp, reward, terminated, truncated,
                                  intervention=bool(getattr(policy, "intervening", False)))
                obs = next_obs
                length += 1
                if record:
                    frames.append(env.render())
                if terminated or truncated:
                    break
            if recorder is not None:
                recorder.end(bool(info.get("success")), info)
            summary.episodes += 1
            summary.successes += int(bool(info.get("success")))
            summary.failures += int(terminated and not info.get("success"))
            summary.per_episode.append(bool(info.get("success")))
            summary.steps += length
            summary.lengths.append(length)
            if info.get("solution"):
                summary.solutions[info["solution"]] += 1
            summary.seconds = time.perf_counter() - t0
            bar.update(tid, advance=1, rate=f"{summary.successes}/{summary.episodes} ok, {summary.steps_per_s:.0f} steps/s")
    if video_path is not None and frames:
        summary.video = str(write_video(frames, video_path, fps=int(getattr(env, "metadata", {}).get("render_fps", 10))))
    return summary


def sim_time(env) -> float:
    """The simulator's clock (the device clock of a sim), or the host's monotonic clock."""
    data = getattr(env.unwrapped, "data", None)
    return float(data.time) if data is not None and hasattr(data, "time") else time.monotonic()


class EpisodeRecorder:
    """Writes rollouts into an episode store: (observation, action) pairs stamped with sim time."""

    def __init__(self, path: str | Path, spec, task: str, source: str = "scripted", image_codec: str = "blosc_zstd"):
        from robot_rl.store import EpisodeWriter

        self.writer = EpisodeWriter(path, spec, image_codec=image_codec)
        self.task, self.source = task, source

    def begin(self, env, seed: int) -> None:
        self.writer.begin_episode(self.source, task=self.task, seed=seed)

    def step(self, obs, action, stamp, reward, terminated, truncated, intervention: bool = False) -> None:
        self.writer.add_step(obs, action, timestamp=stamp, reward=reward, terminated=terminated, truncated=truncated,
                             intervention=intervention)

    def end(self, success: bool, info: dict) -> None:
        extra = {"solution": info["solution"]} if info.get("solution") else {}
        self.writer.end_episode(success=success, **extra)

    def close(self) -> None:
        self.writer.close()


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        iio.imwrite(path, np.stack(frames), duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, np.stack(frames), fps=fps, codec="libx264")
    return path


def summary_table(summaries: list[RolloutSummary]):
    from rich.table import Table

    t = Table(title="rollouts")
    for col in ("task", "policy", "episodes", "success", "95% CI", "mean len", "steps/s", "solutions"):
        t.add_column(col, justify="right" if col not in ("task", "policy", "solutions") else "left")
    for s in summaries:
        lo, hi = s.ci95
        t.add_row(s.task, s.policy, str(s.episodes), f"{100 * s.success_rate:.1f}%", f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                  f"{np.mean(s.lengths or [0]):.1f}", f"{s.steps_per_s:.0f}",
                  ", ".join(f"{k} {v}" for k, v in sorted(s.solutions.items())))
    return t
