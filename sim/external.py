"""Adapter for external gymnasium environments (Meta-World v3, gym-hil, any registered id): exposes
their observations and actions through the robot spec, so the store, policies and CLI treat them
like our own tasks. Vector observations become `state.env`; image observations `image.<name>`."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from robot_rl.sim.base import close_at_exit, preload_llvm_users

from robot_rl.spec import ActionSpec, Camera, ObsKey, Rates, RobotSpec

METAWORLD_PREFIX = "metaworld/"


def _flatten_spaces(space: gym.Space, prefix: str = "") -> list[tuple[str, gym.spaces.Box]]:
    if isinstance(space, gym.spaces.Dict):
        out = []
        for k, sub in space.spaces.items():
            out += _flatten_spaces(sub, f"{prefix}{k}.")
        return out
    if isinstance(space, gym.spaces.Box):
        return [(prefix.rstrip("."), space)]
    raise ValueError(f"external env: unsupported observation space {space!r}; only Box and Dict of Box")


def _is_image(box: gym.spaces.Box) -> bool:
    return box.dtype == np.uint8 and len(box.shape) == 3 and box.shape[-1] == 3


class ExternalEnv(gym.Wrapper):
    """Wraps an external env: dict observations keyed by the spec, 7-D ee-delta actions for
    Meta-World (xyz + gripper used), the env's own action vector otherwise."""

    def __init__(self, env: gym.Env, name: str, policy_hz: float = 10.0, max_steps: int | None = None):
        super().__init__(env)
        self.task_name = name
        self.metaworld = name.startswith(METAWORLD_PREFIX)
        parts = _flatten_spaces(env.observation_space)
        self._vec = [(k, b) for k, b in parts if not _is_image(b)]
        self._img = [(k, b) for k, b in parts if _is_image(b)]
        n_vec = int(sum(np.prod(b.shape) for _, b in self._vec))
        obs: list[ObsKey] = []
        if n_vec:
            obs.append(ObsKey("state.env", (n_vec,), rate_hz=policy_hz, frame="env", sim_only=True,
                              description="the external env's flattened vector observation"))
        cams = []
        for k, b in self._img:
            cam = k.split(".")[-1].replace("-", "_").lower()
            cams.append(Camera(cam, b.shape[1], b.shape[0], b.shape[1], b.shape[0], rate_hz=policy_hz))
            obs.append(ObsKey(f"image.{cam}", tuple(b.shape), "uint8", policy_hz, f"camera:{cam}"))
        n_act = int(np.prod(env.action_space.shape))
        if self.metaworld:
            action = ActionSpec(scale=(0.01, 0.01, 0.01, 0.25, 0.25, 0.25, 1.0),
                                mask=(True, True, True, False, False, False, True))
        else:
            action = ActionSpec(kind="env", frame="env", names=tuple(f"a{i}" for i in range(n_act)),
                                scale=(1.0,) * n_act, low=tuple(map(float, env.action_space.low)),
                                high=tuple(map(float, env.action_space.high)), mask=(True,) * n_act, gripper="none")
        self.spec_ = RobotSpec(name=name, observations=tuple(obs), action=action,
                               rates=Rates(policy_hz=policy_hz), cameras=tuple(cams), robot="external").validate()
        self.observation_space = gym.spaces.Dict({
            k.name: gym.spaces.Box(0, 255, k.shape, np.uint8) if k.is_image
            else gym.spaces.Box(-np.inf, np.inf, k.shape, np.float32) for k in self.spec_.observations})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32) if self.metaworld else env.action_space
        self.max_steps = max_steps or (env.spec.max_episode_steps if env.spec and env.spec.max_episode_steps else 500)
        self._steps = 0
        self.last_raw_obs: Any = None

    @property
    def robot_spec(self) -> RobotSpec:
        return self.spec_

    def _convert(self, raw) -> dict[str, np.ndarray]:
        self.last_raw_obs = raw
        flat = {}
        if isinstance(raw, dict):
            def walk(d, prefix=""):
                for k, v in d.items():
                    if isinstance(v, dict):
                        walk(v, f"{prefix}{k}.")
                    else:
                        flat[f"{prefix}{k}"] = np.asarray(v)
            walk(raw)
        else:
            flat[""] = np.asarray(raw)
        out = {}
        if self._vec:
            out["state.env"] = np.concatenate([flat[k].reshape(-1) for k, _ in self._vec]).astype(np.float32)
        for (k, _), key in zip(self._img, self.spec_.image_keys):
            out[key] = flat[k]
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raw, info = self.env.reset(seed=seed, options=options)
        self._steps = 0
        return self._convert(raw), self._info(info)

    def step(self, action):
        a = np.asarray(action, dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"task '{self.task_name}': action has NaN/Inf: {a}")
        if self.metaworld:
            a = np.array([a[0], a[1], a[2], a[6]], dtype=np.float32)
        raw, reward, terminated, truncated, info = self.env.step(a)
        self._steps += 1
        info = self._info(info)
        terminated = bool(terminated or info["success"])
        truncated = bool((truncated or self._steps >= self.max_steps) and not terminated)
        return self._convert(raw), float(reward), terminated, truncated, info

    def render(self):
        frame = self.env.render()
        close_at_exit(self)
        return frame

    @staticmethod
    def _info(info: dict) -> dict:
        ok = bool(info.get("success", info.get("is_success", info.get("succeed", False))))
        return {**info, "success": ok, "is_success": ok}


def make_external(name: str, env_id: str | None = None, policy_hz: float = 10.0, max_steps: int | None = None,
                  render_mode: str = "rgb_array", **kwargs: Any) -> ExternalEnv:
    """`metaworld/<task>-v3` or any registered gymnasium id (e.g. `gym_hil/PandaPickCubeBase-v0`)."""
    preload_llvm_users()  # these envs create their GL context at construction
    if name.startswith(METAWORLD_PREFIX):
        try:
            import metaworld  # noqa: F401  (registers Meta-World/*)
        except ImportError:
            raise ValueError(f"task '{name}' needs Meta-World: pip install 'robot_rl[metaworld]'") from None
        task = name[len(METAWORLD_PREFIX):]
        env = gym.make("Meta-World/MT1", env_name=task, render_mode=render_mode, camera_name="corner",
                       disable_env_checker=True, **kwargs)
    else:
        env_id = env_id or name
        if env_id.startswith("gym_hil/"):
            import gym_hil  # noqa: F401  (registers gym_hil/*)
        try:
            env = gym.make(env_id, disable_env_checker=True, **kwargs)
        except gym.error.Error as e:
            raise ValueError(f"task '{name}': gymnasium cannot make '{env_id}': {e}") from None
    return ExternalEnv(env, name, policy_hz, max_steps)


class MetaWorldExpert:
    """Meta-World's own scripted policy for the task, behind the expert interface."""

    def __init__(self, env: ExternalEnv):
        from metaworld.policies import ENV_POLICY_MAP

        self.env = env
        task = env.task_name[len(METAWORLD_PREFIX):]
        if task not in ENV_POLICY_MAP:
            raise ValueError(f"Meta-World has no scripted policy for '{task}'")
        self.policy = ENV_POLICY_MAP[task]()

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, obs: dict) -> np.ndarray:
        a4 = np.clip(self.policy.get_action(self.env.last_raw_obs), -1, 1)
        return np.array([a4[0], a4[1], a4[2], 0, 0, 0, a4[3]], dtype=np.float32)
