"""MuJoCo tasks, scenes and scripted experts (import as robot_rl.sim).

Importing it registers the tasks with gymnasium as `robot_rl/<Task>-v0`."""

from robot_rl.sim.registry import TASKS, make_env, make_expert, make_vec_env, register_all

import robot_rl  # noqa: F401  (sets MUJOCO_GL before mujoco loads)

register_all()

__all__ = ["TASKS", "make_env", "make_expert", "make_vec_env", "register_all"]
