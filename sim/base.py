"""Base gymnasium env for the Franka tasks: spec-keyed dict observations, end-effector delta actions
applied to the commanded target (ARCHITECTURE.md, action semantics), impedance control underneath.

A task subclass adds its objects to the cell, places them at reset, and says what success is.
"""

from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np
from robot_rl.sim.arm import PandaArm
from robot_rl.sim.controller import ImpedanceGains
from robot_rl.sim.scene import HOME_QPOS, CellConfig, build_cell

from robot_rl.geometry import action_to_delta, apply_delta
from robot_rl.spec import ActionSpec, Camera, ObsKey, Rates, RobotSpec, arm_state_keys, image_key, object_key

MASKS = {
    "xyz": (True, True, True, False, False, False, False),
    "xyz_gripper": (True, True, True, False, False, False, True),
    "xyz_yaw_gripper": (True, True, True, False, False, True, True),
    "full": (True,) * 7,
}


@dataclass
class Randomization:
    """Domain randomisation, off by default. Ranges are [low, high]; scales multiply nominal values."""

    enabled: bool = False
    friction_scale: tuple[float, float] = (0.7, 1.3)
    mass_scale: tuple[float, float] = (0.7, 1.3)
    camera_pos_jitter: float = 0.01  # m, uniform per axis
    camera_rot_jitter_deg: float = 2.0
    light_scale: tuple[float, float] = (0.6, 1.2)
    latency_s: tuple[float, float] = (0.0, 0.03)  # delay before a new target takes effect

    @classmethod
    def from_config(cls, cfg: dict | None) -> Randomization:
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"randomization: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


@dataclass(frozen=True)
class Workspace:
    low: tuple[float, float, float] = (0.25, -0.4, 0.005)
    high: tuple[float, float, float] = (0.75, 0.4, 0.45)


@dataclass
class TaskSetup:
    """Per-env construction options (the Hydra `task` group maps onto these)."""

    obs_mode: str = "state"  # state | image
    cameras: tuple[str, ...] = ("front", "wrist")
    camera_width: int = 84
    camera_height: int = 84
    render_geometry: str = "collision"  # collision (coarse meshes, ~2x faster on CPU GL) | visual
    policy_hz: float = 10.0
    controller_hz: float = 500.0
    max_steps: int | None = None
    dense_reward: bool = False
    gains: ImpedanceGains = field(default_factory=ImpedanceGains)
    randomization: Randomization = field(default_factory=Randomization)


_LIVE_ENVS: weakref.WeakSet[gym.Env] = weakref.WeakSet()
_atexit_armed = False


def _close_renderers() -> None:
    for env in list(_LIVE_ENVS):
        env.close()


def preload_llvm_users() -> None:
    """Import triton (torch's GPU compiler, which bundles LLVM) before the first GL context: Mesa's
    software renderer loads its own LLVM, and triton imported after it segfaults the process
    (torch imports triton lazily, e.g. from its optimisers). Harmless where triton is absent."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed (CPU-only torch builds) or unusable: nothing to protect
        pass


def close_at_exit(env: gym.Env) -> None:
    """Close `env` at interpreter exit, before mujoco.egl terminates the EGL display (else PyOpenGL
    prints tracebacks). Call after the first renderer exists: atexit runs last-registered first."""
    global _atexit_armed
    _LIVE_ENVS.add(env)
    if not _atexit_armed:
        atexit.register(_close_renderers)
        _atexit_armed = True


class FrankaTaskEnv(gym.Env):
    """One MuJoCo Franka task. Observations are dicts keyed exactly by the spec."""

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 10}
    task_name: ClassVar[str] = "base"
    mask: ClassVar[tuple[bool, ...]] = MASKS["xyz"]
    default_max_steps: ClassVar[int] = 100
    objects: ClassVar[tuple[str, ...]] = ()
    initial_gripper: ClassVar[float] = -1.0
    workspace: ClassVar[Workspace] = Workspace()

    def __init__(self, render_mode: str | None = "rgb_array", render_width: int = 320, render_height: int = 240,
                 **setup: Any):
        rnd = setup.pop("randomization", None)
        gains = setup.pop("gains", None)
        if "cameras" in setup:
            setup["cameras"] = tuple(setup["cameras"])
        self.setup = TaskSetup(**setup)
        self.setup.randomization = rnd if isinstance(rnd, Randomization) else Randomization.from_config(rnd)
        if gains is not None:
            self.setup.gains = gains if isinstance(gains, ImpedanceGains) else ImpedanceGains(**gains)
        if self.setup.obs_mode not in ("state", "image"):
            raise ValueError(f"obs_mode '{self.setup.obs_mode}' is not 'state' or 'image'")
        if self.setup.render_geometry not in ("collision", "visual"):
            raise ValueError(f"render_geometry '{self.setup.render_geometry}' is not 'collision' or 'visual'")
        self.render_mode = render_mode
        self.render_size = (render_width, render_height)
        cell = build_cell(CellConfig())
        self.build_task(cell)
        self.model = cell.compile()
        self.data = mujoco.MjData(self.model)
        self.arm = PandaArm(self.model, self.data, self.setup.controller_hz, self.setup.gains)
        self.max_steps = self.setup.max_steps or self.default_max_steps
        self.dt = 1.0 / self.setup.policy_hz
        self.spec_ = self._make_spec()
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(7,), dtype=np.float32)
        self.observation_space = gym.spaces.Dict({
            k.name: gym.spaces.Box(0, 255, k.shape, np.uint8) if k.is_image
            else gym.spaces.Box(-np.inf, np.inf, k.shape, np.float32)
            for k in self.spec_.observations
        })
        self._scale = np.array(self.spec_.action.scale)
        self._mask = np.array(self.mask, dtype=float)
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._nominal = {
            "geom_friction": self.model.geom_friction.copy(), "body_mass": self.model.body_mass.copy(),
            "cam_pos": self.model.cam_pos.copy(), "cam_quat": self.model.cam_quat.copy(),
            "light_diffuse": self.model.light_diffuse.copy(),
        }
        self._object_bodies = [mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, o) for o in self.objects]
        self._latency = 0.0
        self._steps = 0

    # ---- hooks for tasks ------------------------------------------------------------------
    def build_task(self, cell: mujoco.MjSpec) -> None:
        """Add objects to the cell spec."""

    def reset_task(self, rng: np.random.Generator) -> None:
        """Place objects (qpos) for a new episode. Called after the arm is placed, before mj_forward."""

    def after_reset(self) -> None:
        """Optional settling with the controller running (e.g. close the gripper on a peg)."""

    def drive_tool_to(self, xyz: np.ndarray, max_step: float = 0.06, steps: int = 12) -> None:
        """Move the tool to `xyz` under impedance control (a task's start pose), then let it settle."""
        arm = self.arm
        for _ in range(steps):
            tgt = arm.target
            step = np.asarray(xyz) - tgt[:3]
            tgt[:3] += step * min(1.0, max_step / max(1e-9, float(np.linalg.norm(step))))
            arm.run(tgt, 0.05)
        arm.run(arm.target, 0.15)

    def object_poses(self) -> dict[str, np.ndarray]:
        """Privileged poses (xyz + wxyz) by object name."""
        out = {}
        for name, b in zip(self.objects, self._object_bodies):
            out[name] = np.concatenate([self.data.xpos[b], self.data.xquat[b]])
        return out

    def evaluate(self) -> tuple[bool, bool, float]:
        """(success, failed, dense shaping reward) for the current state."""
        return False, False, 0.0

    def task_info(self) -> dict[str, Any]:
        return {}

    # ---- spec -------------------------------------------------------------------------------
    def _make_spec(self) -> RobotSpec:
        s = self.setup
        rate = s.policy_hz
        obs: list[ObsKey] = list(arm_state_keys(rate))
        cams = tuple(Camera(c, s.camera_width, s.camera_height, s.camera_width, s.camera_height,
                            fovy_deg=float(self.model.cam_fovy[self._cam_id(c)]), rate_hz=rate) for c in s.cameras)
        if s.obs_mode == "state":
            obs += [object_key(o, rate) for o in self.objects]
        else:
            obs += [image_key(c, rate) for c in cams]
        return RobotSpec(
            name=f"sim/{self.task_name}", observations=tuple(obs),
            action=ActionSpec(mask=self.mask), rates=Rates(policy_hz=rate, command_hz=max(rate, 100.0),
                                                           controller_hz=self.arm.controller_hz),
            cameras=cams,
        ).validate()

    @property
    def robot_spec(self) -> RobotSpec:
        return self.spec_

    def _cam_id(self, name: str) -> int:
        cid = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        if cid < 0:
            raise ValueError(f"task '{self.task_name}': no camera '{name}' (cameras: front, wrist)")
        return cid

    # ---- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        m, d, rng = self.model, self.data, self.np_random
        mujoco.mj_resetData(m, d)
        self._randomize(rng)
        self.arm.reset(HOME_QPOS + rng.uniform(-0.02, 0.02, size=7), gripper=self.initial_gripper)
        self.reset_task(rng)
        mujoco.mj_forward(m, d)
        self.arm.sync_target()
        self.after_reset()
        self.arm.sync_target()
        self._steps = 0
        return self._obs(), self._info(False)

    def step(self, action):
        if not np.all(np.isfinite(np.asarray(action, dtype=np.float64))):
            raise ValueError(f"task '{self.task_name}': action has NaN/Inf: {action}")
        dpos, drot, gripper = action_to_delta(action, self._scale, self.mask)
        target = apply_delta(self.arm.target, dpos, drot)
        target[:3] = np.clip(target[:3], self.workspace.low, self.workspace.high)
        if gripper is not None:
            self.arm.set_gripper(gripper)
        self.arm.run(target, self.dt, self._latency)
        self._steps += 1
        success, failed, shaping = self.evaluate()
        reward = float(success) + (shaping if self.setup.dense_reward else 0.0)
        terminated = bool(success or failed)
        truncated = bool(self._steps >= self.max_steps and not terminated)
        return self._obs(), reward, terminated, truncated, self._info(success)

    def _info(self, success: bool) -> dict[str, Any]:
        return {"is_success": bool(success), "success": bool(success), **self.task_info()}

    def _obs(self) -> dict[str, np.ndarray]:
        arm = self.arm
        obs = {
            "state.joint_pos": arm.joint_pos.astype(np.float32),
            "state.joint_vel": arm.joint_vel.astype(np.float32),
            "state.ee_pose": arm.ee_pose.astype(np.float32),
            "state.gripper": np.array([arm.gripper], np.float32),
            "state.wrench": arm.wrench().astype(np.float32),
        }
        if self.setup.obs_mode == "state":
            for name, pose in self.object_poses().items():
                obs[f"state.object.{name}"] = pose.astype(np.float32)
        else:
            for cam in self.setup.cameras:
                obs[f"image.{cam}"] = self.render_camera(cam, self.setup.camera_width, self.setup.camera_height,
                                                         self.setup.render_geometry)
        return obs

    def render_camera(self, camera: str, width: int, height: int, geometry: str = "visual") -> np.ndarray:
        """One RGB frame. `collision` draws the coarse collision meshes instead of the visual ones."""
        r = self._renderers.get((width, height))
        if r is None:
            preload_llvm_users()
            r = self._renderers[(width, height)] = mujoco.Renderer(self.model, height, width)
            close_at_exit(self)
        opt = mujoco.MjvOption()
        if geometry == "collision":
            opt.geomgroup[:] = [1, 1, 0, 1, 0, 0]  # world/task geoms, no visual meshes, collision meshes
        r.update_scene(self.data, camera=camera, scene_option=opt)
        return r.render()

    def render(self):
        return self.render_camera("front", *self.render_size)

    def close(self):
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()

    # ---- domain randomisation ---------------------------------------------------------------
    def _randomize(self, rng: np.random.Generator) -> None:
        m, nom, r = self.model, self._nominal, self.setup.randomization
        m.geom_friction[:] = nom["geom_friction"]
        m.body_mass[:] = nom["body_mass"]
        m.cam_pos[:] = nom["cam_pos"]
        m.cam_quat[:] = nom["cam_quat"]
        m.light_diffuse[:] = nom["light_diffuse"]
        self._latency = 0.0
        if not r.enabled:
            return
        for b in self._object_bodies:
            m.body_mass[b] = nom["body_mass"][b] * rng.uniform(*r.mass_scale)
            geoms = np.flatnonzero(m.geom_bodyid == b)
            m.geom_friction[geoms, 0] = nom["geom_friction"][geoms, 0] * rng.uniform(*r.friction_scale)
        for c in range(m.ncam):
            m.cam_pos[c] = nom["cam_pos"][c] + rng.uniform(-r.camera_pos_jitter, r.camera_pos_jitter, 3)
            jitter = np.deg2rad(r.camera_rot_jitter_deg) * rng.uniform(-1, 1, 3)
            dq = np.zeros(4)
            mujoco.mju_axisAngle2Quat(dq, jitter / (np.linalg.norm(jitter) + 1e-12), np.linalg.norm(jitter))
            mujoco.mju_mulQuat(m.cam_quat[c], nom["cam_quat"][c], dq)
        m.light_diffuse[:] = nom["light_diffuse"] * rng.uniform(*r.light_scale)
        self._latency = float(rng.uniform(*r.latency_s))

    # ---- helpers for tasks and experts ------------------------------------------------------
    def set_free_pose(self, body: str, pos, quat=(1.0, 0.0, 0.0, 0.0)) -> None:
        b = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, body)
        adr = self.model.jnt_qposadr[self.model.body_jntadr[b]]
        self.data.qpos[adr:adr + 3] = pos
        self.data.qpos[adr + 3:adr + 7] = quat

    def geom_contact(self, geoms_a: np.ndarray, geoms_b: np.ndarray) -> bool:
        d = self.data
        g1, g2 = d.contact.geom1[: d.ncon], d.contact.geom2[: d.ncon]
        return bool(np.any((np.isin(g1, geoms_a) & np.isin(g2, geoms_b)) | (np.isin(g2, geoms_a) & np.isin(g1, geoms_b))))

    def body_geoms(self, body: str) -> np.ndarray:
        b = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, body)
        return np.flatnonzero(self.model.geom_bodyid == b)
