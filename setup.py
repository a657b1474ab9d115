"""Shim so `colcon build` can build robot_rl as an ament_python package in a ROS 2 workspace.

Metadata and dependencies live in pyproject.toml. Under colcon (setup.py build/install/develop) this
adds what the ament index and `ros2 launch` expect: the package marker, package.xml, launch files and
hardware configs under share/robot_rl, and one executable per node under lib/robot_rl (generated from
the `robot_rl.nodes` entry points). A plain `pip install` builds a wheel and skips all of it.
"""

import os
import stat
import sys
from glob import glob

from setuptools import setup

LEGACY_COMMANDS = {"build", "install", "develop"}


def node_executables() -> list[str]:
    import tomllib

    with open("pyproject.toml", "rb") as f:
        nodes = tomllib.load(f)["project"]["entry-points"]["robot_rl.nodes"]
    out_dir = os.path.join("build", "robot_rl_nodes")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, target in sorted(nodes.items()):
        module, func = target.split(":")
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.write(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        paths.append(path)
    return paths


data_files = []
if LEGACY_COMMANDS & set(sys.argv[1:]):
    data_files = [
        ("share/ament_index/resource_index/packages", ["resource/robot_rl"]),
        ("share/robot_rl", ["package.xml"]),
        ("share/robot_rl/launch", sorted(glob("launch/*.launch.yaml") + glob("launch/*.launch.xml"))),
        ("share/robot_rl/hardware_configs", sorted(glob("hardware_configs/*.yaml"))),
        ("lib/robot_rl", node_executables()),
    ]

setup(data_files=data_files)
