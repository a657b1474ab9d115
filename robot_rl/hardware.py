"""Hardware configs: one YAML per robot cell (`hardware_configs/`), loaded into typed dataclasses.
The loader turns a file into the robot spec, the Hydra config and each node's ROS parameters.

A wrong field is one `HardwareConfigError` line naming the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from robot_rl.drivers.teleop import DeviceMapping
from robot_rl.spec import ActionSpec, Camera, ObsKey, Rates, RobotSpec, arm_state_keys, image_key


class HardwareConfigError(ValueError):
    """One line: which file, which field, what to do."""


@dataclass(frozen=True)
class SimSection:
    task: str = "reach"
    mode: str = "realtime"  # realtime | lockstep
    seed: int = 0
    render_geometry: str = "visual"
    link: str = ""  # sim link name; "" = one per ROS domain


@dataclass(frozen=True)
class ArmSection:
    backend: str = "mujoco"  # mujoco | franka
    address: str = ""  # franka: the robot's FCI address
    home_qpos: tuple[float, ...] = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)
    joint_lower: tuple[float, ...] = (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973)
    joint_upper: tuple[float, ...] = (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973)
    translational_stiffness: float = 1000.0  # N/m
    rotational_stiffness: float = 60.0  # Nm/rad
    damping_ratio: float = 1.0
    max_pos_error: float = 0.03  # m: the controller clips its reference this close to the measured pose
    max_rot_error: float = 0.3  # rad
    state_hz: float = 100.0
    # franka: the policy's end-effector frame in the Franka's nominal EE frame (libfranka NE_T_EE, set with
    # Robot.set_EE; Desk's end-effector settings give F_T_NE): xyz (m) + quaternion wxyz. Policies trained in
    # the sim read the sim's `pinch` frame: set this so that the measured ee_pose is that frame.
    ee_transform: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    # franka: SCHED_FIFO priority of the 1 kHz control loop (0: normal scheduling). libfranka aborts a motion
    # after 20 lost command cycles: a loop at normal priority starves beside a learner or a busy graph.
    rt_priority: int = 80


@dataclass(frozen=True)
class SafetySection:
    workspace_low: tuple[float, float, float] = (0.25, -0.35, 0.0)
    workspace_high: tuple[float, float, float] = (0.75, 0.35, 0.55)
    nominal_quat: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 0.0)
    max_tilt_deg: float = 45.0
    max_speed: float = 0.25
    max_angular_speed: float = 1.5
    action_clip: tuple[float, ...] = (1.0,) * 7
    watchdog_periods: float = 2.0
    watchdog_min_ms: float = 50.0  # a stream is never stale sooner: Python nodes on a busy host jitter by tens of ms
    wrench_limit: float = 40.0  # N: the safety filter holds above this (policy-server issue)


@dataclass(frozen=True)
class CameraSection:
    name: str
    backend: str = "mujoco"  # mujoco | opencv | realsense
    width: int = 640
    height: int = 480
    rate_hz: float = 30.0
    policy_width: int = 84
    policy_height: int = 84
    fovy_deg: float = 45.0
    serial: str = ""  # realsense
    device: str = ""  # opencv: V4L2 index or video file


@dataclass(frozen=True)
class FTSection:
    backend: str = "mujoco"  # mujoco | netft | robotiq_ft300
    address: str = ""  # netft: host[:port]; robotiq_ft300: serial port
    counts_per_force: float = 1_000_000.0
    counts_per_torque: float = 1_000_000.0
    rate_hz: float = 100.0
    payload_mass: float = 0.0  # kg, below the sensor
    payload_com: tuple[float, float, float] = (0.0, 0.0, 0.0)  # m, sensor frame
    sensor_in_ee: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)  # wxyz, sensor frame in the ee frame


@dataclass(frozen=True)
class TeleopSection:
    """The operator's device (human-in-the-loop issue): `teleop_node` reads it, `intervention_mux`
    integrates its twist. Deadband, scale and axis mapping per device (drivers/teleop.py)."""

    device: str = "keyboard"  # keyboard | spacemouse | spacenav | joy | web (the operator console's joystick)
    device_path: str = ""  # spacemouse: /dev/hidrawN ("" = find it); spacenav: socket; keyboard: FIFO ("" = terminal)
    rate_hz: float = 50.0  # twist samples per second
    engage: str = "both"  # button (toggles) | motion (above the deadband) | both
    release_after_s: float = 0.5  # control taken by motion goes back after this long without motion
    key_timeout_s: float = 0.6  # keyboard: an axis stops this long after its key stopped repeating
    watchdog_ms: float = 100.0  # mux: a twist older than this is not integrated (the target holds)
    # mux: a teleop target is stamped this far past the measured pose that made it. It must cover the
    # hops to the arm (mux → safety filter → arm_node): a target that arrives after its time is dropped
    # as late, never shifted — at one command period (10 ms) a loaded host dropped most of them
    lead_ms: float = 50.0
    keyboard: DeviceMapping = field(default_factory=lambda: DeviceMapping(deadband=0.0, max_linear=0.05))
    spacemouse: DeviceMapping = field(default_factory=DeviceMapping)
    spacenav: DeviceMapping = field(default_factory=DeviceMapping)
    joy: DeviceMapping = field(default_factory=lambda: DeviceMapping(deadband=0.15))
    web: DeviceMapping = field(default_factory=lambda: DeviceMapping(deadband=0.05))

    def mapping(self) -> DeviceMapping:
        return getattr(self, self.device)


@dataclass(frozen=True)
class RewardSection:
    """A robot cell's own reward, for unattended episodes (RL fine-tuning on hardware): the episode
    manager computes it from the measured pose. `reach`: success within `tolerance` (m) of `goal`,
    reward success − distance (the sim's `reach_point` task, whose `goal` must be the same point)."""

    kind: str = "none"  # none (the operator says success) | reach
    goal: tuple[float, float, float] = (0.5, 0.1, 0.25)
    tolerance: float = 0.02


@dataclass(frozen=True)
class TransportSection:
    rt_priority: int = 10  # SCHED_FIFO priority of camera and image-consumer processes (0: off)
    fastdds_profile: str = "shm"  # shm: the package's large-segment SHM profile | none | a file path


@dataclass(frozen=True)
class HardwareConfig:
    name: str
    kind: str = "sim"  # sim | hardware
    rates: Rates = field(default_factory=Rates)
    sim: SimSection = field(default_factory=SimSection)
    arm: ArmSection = field(default_factory=ArmSection)
    safety: SafetySection = field(default_factory=SafetySection)
    cameras: tuple[CameraSection, ...] = ()
    ft: FTSection = field(default_factory=FTSection)
    teleop: TeleopSection = field(default_factory=TeleopSection)
    reward: RewardSection = field(default_factory=RewardSection)
    transport: TransportSection = field(default_factory=TransportSection)
    source: str = ""

    @property
    def is_sim(self) -> bool:
        return self.kind == "sim"

    def camera(self, name: str) -> CameraSection:
        for c in self.cameras:
            if c.name == name:
                return c
        raise HardwareConfigError(f"{self.source}: no camera '{name}' (cameras: {[c.name for c in self.cameras]})")

    def safety_limits(self):
        from robot_rl.drivers.safety import SafetyLimits

        s = self.safety
        return SafetyLimits(s.workspace_low, s.workspace_high, s.nominal_quat, float(np.deg2rad(s.max_tilt_deg)),
                            s.max_speed, s.max_angular_speed, s.action_clip, s.watchdog_periods,
                            s.watchdog_min_ms / 1e3)

    def robot_spec(self) -> RobotSpec:
        """The spec this cell offers the stack: arm state, wrench, cameras at policy resolution."""
        rate = self.rates.policy_hz
        cams = tuple(Camera(c.name, c.width, c.height, c.policy_width, c.policy_height, c.fovy_deg, c.rate_hz, c.serial)
                     for c in self.cameras)
        obs: list[ObsKey] = [*arm_state_keys(rate), *(image_key(c, rate) for c in cams)]
        return RobotSpec(name=f"{self.kind}/{self.name}", observations=tuple(obs), action=ActionSpec(),
                         rates=self.rates, cameras=cams).validate()

    def hydra(self):
        from omegaconf import OmegaConf

        d = dataclasses.asdict(self)
        d.pop("source")
        return OmegaConf.create(d)

    def ros_params(self, node: str, camera: str | None = None) -> dict[str, Any]:
        """Flat parameters one node declares (defaults from this file; `-p` overrides win)."""
        sections: dict[str, Any] = {
            "sim_world": {"sim": self.sim, "safety": self.safety, "rates": self.rates},
            "arm_node": {"arm": self.arm, "safety": self.safety, "rates": self.rates},
            "ft_node": {"ft": self.ft},
            "episode_manager": {"sim": self.sim, "reward": self.reward},
            "teleop_node": {"teleop": self.teleop},
            "intervention_mux": {"teleop": self.teleop},
            "web_console": {"teleop": self.teleop},
            "camera_node": {"camera": self.camera(camera)} if camera else {},
        }
        if node not in sections:
            raise HardwareConfigError(f"no ROS parameters for node '{node}' (nodes: {sorted(sections)})")
        out: dict[str, Any] = {}

        def flat(prefix: str, d: dict) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    flat(f"{prefix}.{k}", v)
                else:
                    out[f"{prefix}.{k}"] = list(v) if isinstance(v, tuple) else v

        for prefix, section in sections[node].items():
            flat(prefix, dataclasses.asdict(section))
        return out


def section_from_params(cls, params: dict[str, Any], prefix: str):
    """A config section rebuilt from a node's flat `prefix.field[.sub]` parameters, so that `-p`
    overrides apply; a wrong value is one HardwareConfigError line."""
    tree: dict[str, Any] = {}
    for k, v in params.items():
        if k.startswith(prefix + "."):
            *path, leaf = k[len(prefix) + 1:].split(".")
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = v
    return _build(cls, tree, "ROS parameters", prefix + ".")


# ---- loading ---------------------------------------------------------------------------------
def config_path(path_or_name: str | Path) -> Path:
    """A file path, or the name of a config shipped with the package (`sim`, `franka_panda`)."""
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.exists():
            raise HardwareConfigError(f"hardware config {p} does not exist")
        return p
    shipped = resources.files("robot_rl.hardware_configs") / f"{path_or_name}.yaml"
    if not shipped.is_file():
        names = sorted(f.name[:-5] for f in resources.files("robot_rl.hardware_configs").iterdir()
                       if f.name.endswith(".yaml"))
        raise HardwareConfigError(f"hardware config '{path_or_name}' is neither a file nor a shipped config ({names})")
    return Path(str(shipped))


def load_hardware_config(path_or_name: str | Path) -> HardwareConfig:
    path = config_path(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HardwareConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise HardwareConfigError(f"{path}: expected a mapping at the top level")
    cfg = _build(HardwareConfig, raw, str(path), "")
    cfg = dataclasses.replace(cfg, source=str(path))
    _check(cfg)
    return cfg


def _build(cls, data: Any, src: str, where: str):
    if not isinstance(data, dict):
        raise HardwareConfigError(f"{src}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {sorted(names)}"
            raise HardwareConfigError(f"{src}: unknown field '{where}{k}'{hint}")
        kwargs[k] = _coerce(hints[k], v, src, f"{where}{k}")
    try:
        return cls(**kwargs)
    except HardwareConfigError:
        raise
    except (TypeError, ValueError) as e:  # a section's own check (e.g. a teleop mapping)
        raise HardwareConfigError(f"{src}: '{where.rstrip('.') or 'top level'}': {e}") from None


def _coerce(tp, v: Any, src: str, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, src, where + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, (list, tuple)):
            raise HardwareConfigError(f"{src}: '{where}' must be a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], x, src, f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise HardwareConfigError(f"{src}: '{where}' must have {len(args)} entries, got {len(v)}")
        return tuple(_coerce(a, x, src, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    if origin in (typing.Union, types.UnionType):
        return v
    if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if tp is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if tp is str and isinstance(v, (str, int)) and not isinstance(v, bool):
        return str(v)
    if tp is bool and isinstance(v, bool):
        return v
    raise HardwareConfigError(f"{src}: '{where}' must be {tp.__name__}, got {v!r}")


def _check(cfg: HardwareConfig) -> None:
    src = cfg.source
    choices = {"kind": (cfg.kind, ("sim", "hardware")), "arm.backend": (cfg.arm.backend, ("mujoco", "franka")),
               "ft.backend": (cfg.ft.backend, ("mujoco", "netft", "robotiq_ft300")),
               "sim.mode": (cfg.sim.mode, ("realtime", "lockstep")),
               "teleop.device": (cfg.teleop.device, ("keyboard", "spacemouse", "spacenav", "joy", "web")),
               "teleop.engage": (cfg.teleop.engage, ("button", "motion", "both")),
               "reward.kind": (cfg.reward.kind, ("none", "reach"))}
    choices.update({f"cameras.{c.name}.backend": (c.backend, ("mujoco", "opencv", "realsense")) for c in cfg.cameras})
    for where, (value, allowed) in choices.items():
        if value not in allowed:
            raise HardwareConfigError(f"{src}: '{where}' is '{value}'; allowed: {list(allowed)}")
    sim_backends = [b for b in (cfg.arm.backend, cfg.ft.backend, *(c.backend for c in cfg.cameras)) if b == "mujoco"]
    if cfg.kind == "hardware" and sim_backends:
        raise HardwareConfigError(f"{src}: a hardware cell cannot use the mujoco backend; set real backends")
    if cfg.kind == "hardware" and cfg.arm.backend == "franka" and not cfg.arm.address:
        raise HardwareConfigError(f"{src}: 'arm.address' is empty; set the Franka's FCI address")
    if len({c.name for c in cfg.cameras}) != len(cfg.cameras):
        raise HardwareConfigError(f"{src}: camera names must be unique")
    if len(cfg.arm.ee_transform) != 7 or abs(float(np.linalg.norm(cfg.arm.ee_transform[3:])) - 1.0) > 1e-3:
        raise HardwareConfigError(f"{src}: 'arm.ee_transform' needs xyz + a unit quaternion wxyz (7 values), "
                                  f"got {list(cfg.arm.ee_transform)}")
    if len(cfg.arm.home_qpos) != 7 or len(cfg.arm.joint_lower) != 7 or len(cfg.arm.joint_upper) != 7:
        raise HardwareConfigError(f"{src}: 'arm.home_qpos', 'arm.joint_lower' and 'arm.joint_upper' need 7 values")
    if not 0 <= cfg.arm.rt_priority <= 99:
        raise HardwareConfigError(f"{src}: 'arm.rt_priority' is {cfg.arm.rt_priority}; SCHED_FIFO priorities are 1..99 "
                                  "(0: normal scheduling)")
    if not 0.0 < cfg.teleop.lead_ms <= 1000.0:
        raise HardwareConfigError(f"{src}: 'teleop.lead_ms' is {cfg.teleop.lead_ms:g}; it must be in (0, 1000] ms")
    try:
        cfg.safety_limits()
    except ValueError as e:
        raise HardwareConfigError(f"{src}: {e}") from None
