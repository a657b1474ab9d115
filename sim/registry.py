"""The task registry: one table maps task names to gymnasium ids, env classes and scripted experts.
Anything not in the table is an external env (`metaworld/<task>`, or any registered gymnasium id)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from robot_rl.sim.external import METAWORLD_PREFIX, MetaWorldExpert, make_external


@dataclass(frozen=True)
class TaskEntry:
    name: str
    env_id: str
    entry_point: str
    expert: str
    description: str


TASKS: dict[str, TaskEntry] = {e.name: e for e in (
    TaskEntry("reach", "robot_rl/Reach-v0", "robot_rl.sim.tasks.reach:ReachEnv",
              "robot_rl.sim.tasks.reach:ReachExpert", "move the tool to a goal in free space"),
    TaskEntry("lift", "robot_rl/Lift-v0", "robot_rl.sim.tasks.lift:LiftEnv",
              "robot_rl.sim.tasks.lift:LiftExpert", "pick a 4 cm cube at a random pose and lift it 8 cm"),
    TaskEntry("peg_insert", "robot_rl/PegInsert-v0", "robot_rl.sim.tasks.peg_insert:PegInsertEnv",
              "robot_rl.sim.tasks.peg_insert:PegInsertExpert",
              "insert a held square peg, 2 mm clearance, hole known to a few mm (contact-rich)"),
    TaskEntry("reach_around", "robot_rl/ReachAround-v0", "robot_rl.sim.tasks.reach_around:ReachAroundEnv",
              "robot_rl.sim.tasks.reach_around:ReachAroundExpert",
              "pass a post in front or behind to reach a goal (two solutions)"),
    TaskEntry("reach_point", "robot_rl/ReachPoint-v0", "robot_rl.sim.tasks.reach_point:ReachPointEnv",
              "robot_rl.sim.tasks.reach:ReachExpert",
              "move the tool from a random start to the cell's fixed point (no sim-only key: runs on hardware)"),
)}

EXTERNAL_EXAMPLES = {
    "metaworld/push-v3": "Meta-World v3 (any task: metaworld/<name>-v3), its own scripted expert",
    "gym_hil/PandaPickCubeBase-v0": "gym-hil Panda pick-cube (any registered gymnasium id works; no expert)",
}


def _load(path: str):
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


def register_all() -> None:
    for e in TASKS.values():
        if e.env_id not in gym.registry:
            gym.register(id=e.env_id, entry_point=e.entry_point, disable_env_checker=True)


def is_external(name: str) -> bool:
    return name not in TASKS


def make_env(name: str, **setup: Any) -> gym.Env:
    """A task by name with its setup options (the Hydra `task` group without `name`)."""
    if name in TASKS:
        return _load(TASKS[name].entry_point)(**setup)
    if "/" not in name:
        raise ValueError(f"unknown task '{name}'; tasks: {sorted(TASKS)}, or metaworld/<task>-v3, or a gymnasium id")
    allowed = {k: v for k, v in setup.items() if k in ("env_id", "policy_hz", "max_steps", "render_mode")}
    return make_external(name, **allowed)


def make_expert(env: gym.Env):
    base = env.unwrapped if not hasattr(env, "task_name") else env
    name = getattr(base, "task_name", None)
    if name in TASKS:
        return _load(TASKS[name].expert)(env)
    if isinstance(name, str) and name.startswith(METAWORLD_PREFIX):
        return MetaWorldExpert(env)
    raise ValueError(f"no scripted expert for task '{name}'; use policy=random")


def make_vec_env(name: str, num_envs: int, mode: str = "async", **setup: Any) -> gym.vector.VectorEnv:
    """Batched envs through gymnasium's vector API (async = one process per env)."""
    if name not in TASKS:
        fns = [lambda: make_env(name, **setup)] * num_envs
    else:
        register_all()
        return gym.make_vec(TASKS[name].env_id, num_envs=num_envs, vectorization_mode=mode, **setup)
    return gym.vector.AsyncVectorEnv(fns) if mode == "async" else gym.vector.SyncVectorEnv(fns)
