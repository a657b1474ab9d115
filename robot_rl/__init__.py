"""robot_rl: a real-robot learning stack (ROS 2 nodes, zarr stores, diffusion/consistency policies, MuJoCo tasks)."""

import os as _os

# Headless rendering by default; a user with a display can export MUJOCO_GL=glfw.
_os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"
