"""`colcon build` of robot_rl as an ament_python package in a ROS 2 workspace (colcon from PyPI):
the ament index marker, package.xml, launch files, hardware configs and one executable per node."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "package.xml", "README.md", "resource", "robot_rl", "drivers", "sim", "policies",
           "launch", "hardware_configs"]


def test_colcon_builds_the_package_with_node_executables(tmp_path):
    colcon = Path(sys.executable).parent / "colcon"
    if not colcon.exists():
        pytest.fail("colcon is part of the dev extra; run `make test` (it installs it)")
    src = tmp_path / "ws" / "src" / "robot_rl"
    src.mkdir(parents=True)
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    r = subprocess.run([str(colcon), "build", "--packages-select", "robot_rl"], cwd=tmp_path / "ws",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    inst = tmp_path / "ws" / "install" / "robot_rl"
    assert (inst / "share" / "ament_index" / "resource_index" / "packages" / "robot_rl").exists()
    assert (inst / "share" / "robot_rl" / "package.xml").exists()
    assert {p.name for p in (inst / "share" / "robot_rl" / "launch").iterdir()} >= {
        "sim_bringup.launch.yaml", "robot_bringup.launch.xml"}
    assert (inst / "share" / "robot_rl" / "hardware_configs" / "franka_panda.yaml").exists()
    from importlib import metadata

    nodes = {ep.name for ep in metadata.entry_points(group="robot_rl.nodes")}
    assert {"sim_world", "camera_node", "ft_node", "arm_node", "episode_manager", "policy_server"} <= nodes
    assert {p.name for p in (inst / "lib" / "robot_rl").iterdir()} == nodes
    # an installed executable runs: a missing hardware config is its one-line error
    exe = inst / "lib" / "robot_rl" / "arm_node"
    r = subprocess.run([str(exe), "--ros-args", "-p", "hardware_config:=/nonexistent/cell.yaml"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: hardware config /nonexistent/cell.yaml does not exist"
