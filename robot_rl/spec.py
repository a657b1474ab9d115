"""The robot spec: the one typed contract shared by sim tasks, drivers, stores, policies and nodes.

It imports nothing of the project. Everything else reads observation keys, action layout,
rates and cameras from here; a checkpoint stores the policy-relevant subset and its hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

_KEY_RE = re.compile(r"^(image\.[a-z][a-z0-9_]*|state\.[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?)$")
_DTYPES = ("uint8", "float32", "float64", "int32", "int64", "bool")
_ACTION_KINDS = ("ee_delta", "joint", "env")  # env: an external env's own action vector
_EE_DELTA_NAMES = ("x", "y", "z", "rx", "ry", "rz", "gripper")


class SpecError(ValueError):
    """A spec, or data checked against one, is wrong. The message is one line: what, where, what to do."""


@dataclass(frozen=True)
class ObsKey:
    """One observation key: `image.<camera>`, `state.<name>` or `state.object.<name>`."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    rate_hz: float = 10.0
    frame: str = "base"
    required: bool = True
    sim_only: bool = False
    description: str = ""

    @property
    def is_image(self) -> bool:
        return self.name.startswith("image.")


@dataclass(frozen=True)
class Camera:
    """A camera: full resolution is recorded, policy resolution is fed to the model."""

    name: str
    width: int
    height: int
    policy_width: int = 84
    policy_height: int = 84
    fovy_deg: float = 45.0
    rate_hz: float = 30.0
    serial: str = ""

    def intrinsics(self, width: int | None = None, height: int | None = None) -> tuple[float, float, float, float]:
        """Pinhole (fx, fy, cx, cy) at the given resolution (full resolution by default)."""
        w = width or self.width
        h = height or self.height
        fy = 0.5 * h / np.tan(np.deg2rad(self.fovy_deg) / 2)
        return float(fy), float(fy), (w - 1) / 2.0, (h - 1) / 2.0


@dataclass(frozen=True)
class ActionSpec:
    """Action layout. `ee_delta`: xyz (m) + rotation vector (rad) + gripper, in `frame`.

    A normalised action a ∈ [low, high] means a physical delta a * scale. The mask states which
    dimensions a task uses; unused dimensions are ignored by the env and zero in demonstrations.
    """

    kind: str = "ee_delta"
    frame: str = "base"
    names: tuple[str, ...] = _EE_DELTA_NAMES
    scale: tuple[float, ...] = (0.05, 0.05, 0.05, 0.25, 0.25, 0.25, 1.0)
    low: tuple[float, ...] = (-1.0,) * 7
    high: tuple[float, ...] = (1.0,) * 7
    mask: tuple[bool, ...] = (True,) * 7
    gripper: str = "absolute"  # the gripper dimension is an absolute command: -1 open, +1 closed

    @property
    def dim(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Rates:
    policy_hz: float = 10.0
    command_hz: float = 100.0
    controller_hz: float = 500.0

    @property
    def dt(self) -> float:
        return 1.0 / self.policy_hz


@dataclass(frozen=True)
class RobotSpec:
    """A robot cell (or sim task) as the rest of the stack sees it."""

    name: str
    observations: tuple[ObsKey, ...]
    action: ActionSpec = field(default_factory=ActionSpec)
    rates: Rates = field(default_factory=Rates)
    cameras: tuple[Camera, ...] = ()
    robot: str = "franka_panda"
    schema_version: int = SCHEMA_VERSION

    # ---- lookup -------------------------------------------------------------------------
    def key(self, name: str) -> ObsKey:
        for k in self.observations:
            if k.name == name:
                return k
        raise SpecError(f"spec '{self.name}': no observation key '{name}'; keys are {self.keys()}")

    def keys(self) -> list[str]:
        return [k.name for k in self.observations]

    def camera(self, name: str) -> Camera:
        for c in self.cameras:
            if c.name == name:
                return c
        raise SpecError(f"spec '{self.name}': no camera '{name}'; cameras are {[c.name for c in self.cameras]}")

    @property
    def image_keys(self) -> list[str]:
        return [k.name for k in self.observations if k.is_image]

    @property
    def state_keys(self) -> list[str]:
        return [k.name for k in self.observations if not k.is_image]

    @property
    def sim_only_keys(self) -> list[str]:
        return [k.name for k in self.observations if k.sim_only]

    def without_sim_only(self) -> RobotSpec:
        return replace(self, observations=tuple(k for k in self.observations if not k.sim_only))

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> RobotSpec:
        """Raise SpecError naming the first problem; return self when the spec is consistent."""
        where = f"spec '{self.name}'"
        if self.schema_version != SCHEMA_VERSION:
            raise SpecError(f"{where}: schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        if not self.observations:
            raise SpecError(f"{where}: no observation keys; declare at least one")
        seen: set[str] = set()
        cams = {c.name for c in self.cameras}
        for i, k in enumerate(self.observations):
            at = f"{where} observations[{i}] '{k.name}'"
            if not _KEY_RE.match(k.name):
                raise SpecError(f"{at}: bad key name; use image.<camera>, state.<name> or state.object.<name>")
            if k.name in seen:
                raise SpecError(f"{at}: duplicate key")
            seen.add(k.name)
            if k.dtype not in _DTYPES:
                raise SpecError(f"{at}: dtype '{k.dtype}' not one of {_DTYPES}")
            if not k.shape or any((not isinstance(s, int)) or s <= 0 for s in k.shape):
                raise SpecError(f"{at}: shape {k.shape} must be a non-empty tuple of positive ints")
            if k.rate_hz <= 0:
                raise SpecError(f"{at}: rate_hz must be > 0")
            if k.is_image:
                cam = k.name.split(".", 1)[1]
                if cam not in cams:
                    raise SpecError(f"{at}: no camera '{cam}' in spec.cameras {sorted(cams)}")
                if k.dtype != "uint8" or len(k.shape) != 3 or k.shape[2] != 3:
                    raise SpecError(f"{at}: images are uint8 HxWx3, got {k.dtype} {k.shape}")
            if k.name.startswith("state.object.") and not k.sim_only:
                raise SpecError(f"{at}: object poses are privileged; mark sim_only=True")
            if k.sim_only and k.required and not k.name.startswith(("state.object.", "state.env")):
                raise SpecError(f"{at}: only state.object.* and state.env may be sim_only")
        a = self.action
        at = f"{where} action"
        if a.kind not in _ACTION_KINDS:
            raise SpecError(f"{at}: kind '{a.kind}' not one of {_ACTION_KINDS}")
        n = a.dim
        for fname in ("scale", "low", "high", "mask"):
            if len(getattr(a, fname)) != n:
                raise SpecError(f"{at}: {fname} has {len(getattr(a, fname))} entries, names has {n}")
        if any(lo >= hi for lo, hi in zip(a.low, a.high)):
            raise SpecError(f"{at}: every low must be < high")
        if any(s <= 0 for s in a.scale):
            raise SpecError(f"{at}: scale entries must be > 0")
        if not any(a.mask):
            raise SpecError(f"{at}: mask uses no dimension")
        if a.kind == "ee_delta" and tuple(a.names) != _EE_DELTA_NAMES:
            raise SpecError(f"{at}: ee_delta actions are named {_EE_DELTA_NAMES}, got {tuple(a.names)}")
        r = self.rates
        if not 0 < r.policy_hz <= r.command_hz <= 100:
            raise SpecError(f"{where} rates: need 0 < policy_hz <= command_hz <= 100 Hz (DDS from Python), got {r}")
        if not r.command_hz < r.controller_hz:
            raise SpecError(f"{where} rates: controller_hz must exceed command_hz, got {r}")
        for c in self.cameras:
            if min(c.width, c.height, c.policy_width, c.policy_height) <= 0:
                raise SpecError(f"{where} camera '{c.name}': resolutions must be positive")
        return self

    def check_observation(self, obs: Mapping[str, Any], where: str = "observation") -> None:
        """Check one step's observation dict against the spec (shape and dtype per key)."""
        for k in self.observations:
            if k.name not in obs:
                if k.required:
                    raise SpecError(f"{where}: missing required key '{k.name}' (spec '{self.name}')")
                continue
            v = np.asarray(obs[k.name])
            if tuple(v.shape) != tuple(k.shape):
                raise SpecError(f"{where} key '{k.name}': shape {tuple(v.shape)}, spec says {tuple(k.shape)}")
            if v.dtype != np.dtype(k.dtype):
                raise SpecError(f"{where} key '{k.name}': dtype {v.dtype}, spec says {k.dtype}")
        extra = set(obs) - set(self.keys())
        if extra:
            raise SpecError(f"{where}: keys {sorted(extra)} are not in spec '{self.name}'")

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RobotSpec:
        try:
            return cls(
                name=d["name"],
                observations=tuple(ObsKey(**{**o, "shape": tuple(o["shape"])}) for o in d["observations"]),
                action=ActionSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("action", {}).items()}),
                rates=Rates(**d.get("rates", {})),
                cameras=tuple(Camera(**c) for c in d.get("cameras", ())),
                robot=d.get("robot", "franka_panda"),
                schema_version=d.get("schema_version", SCHEMA_VERSION),
            ).validate()
        except (KeyError, TypeError) as e:
            raise SpecError(f"spec '{d.get('name', '?')}': malformed ({type(e).__name__}: {e}); "
                            "regenerate it with RobotSpec.to_json()") from None

    @classmethod
    def from_json(cls, text: str) -> RobotSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"spec JSON is not valid JSON: {e}") from None

    # ---- the policy-relevant subset ----------------------------------------------------
    def policy_subset(self, keys: Iterable[str]) -> dict[str, Any]:
        """What a checkpoint records: the keys it reads (name/shape/dtype/sim_only), action layout, rate."""
        ks = sorted(set(keys))
        return {
            "robot": self.robot,
            "observations": [
                {"name": k.name, "shape": list(k.shape), "dtype": k.dtype, "sim_only": k.sim_only}
                for k in (self.key(n) for n in ks)
            ],
            "action": {"kind": self.action.kind, "frame": self.action.frame, "names": list(self.action.names),
                       "scale": list(self.action.scale), "mask": list(self.action.mask),
                       "gripper": self.action.gripper},
            "policy_hz": self.rates.policy_hz,
        }

    def policy_hash(self, keys: Iterable[str]) -> str:
        return subset_hash(self.policy_subset(keys))


def subset_hash(subset: Mapping[str, Any]) -> str:
    """Content hash of a spec subset; a number hashes by value (a rate of 10 from a YAML file equals 10.0)."""
    def canonical(v):
        if isinstance(v, Mapping):
            return {k: canonical(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canonical(x) for x in v]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    return hashlib.sha256(json.dumps(canonical(subset), sort_keys=True).encode()).hexdigest()


def check_compatible(subset: Mapping[str, Any], spec: RobotSpec, hardware: bool) -> None:
    """Refuse a graph (spec) that cannot feed a checkpoint's policy subset. One clear error."""
    for o in subset["observations"]:
        name = o["name"]
        if name not in spec.keys():
            raise SpecError(f"checkpoint reads '{name}' but spec '{spec.name}' has no such key; "
                            "retrain on this cell's keys or add the sensor to the hardware config")
        k = spec.key(name)
        if list(k.shape) != list(o["shape"]):
            raise SpecError(f"checkpoint reads '{name}' with shape {o['shape']}, spec '{spec.name}' gives {list(k.shape)}")
        if hardware and o.get("sim_only"):
            raise SpecError(f"checkpoint reads sim-only key '{name}', which a hardware cell cannot provide; "
                            "use a checkpoint trained without privileged keys")
    a = subset["action"]
    if a["kind"] != spec.action.kind or list(a["names"]) != list(spec.action.names):
        raise SpecError(f"checkpoint acts in {a['kind']} {a['names']}, spec '{spec.name}' in "
                        f"{spec.action.kind} {list(spec.action.names)}")


# ---- standard keys for a Franka-like arm -----------------------------------------------------
def arm_state_keys(rate_hz: float, n_joints: int = 7, wrench: bool = True) -> tuple[ObsKey, ...]:
    """The proprioceptive keys every arm cell exposes (real and sim alike)."""
    keys = [
        ObsKey("state.joint_pos", (n_joints,), rate_hz=rate_hz, frame="joint", description="rad"),
        ObsKey("state.joint_vel", (n_joints,), rate_hz=rate_hz, frame="joint", description="rad/s"),
        ObsKey("state.ee_pose", (7,), rate_hz=rate_hz, frame="base", description="xyz (m) + quaternion wxyz"),
        ObsKey("state.gripper", (1,), rate_hz=rate_hz, frame="gripper", description="0 open .. 1 closed"),
    ]
    if wrench:
        keys.append(ObsKey("state.wrench", (6,), rate_hz=rate_hz, frame="sensor",
                           description="force N xyz, torque Nm xyz, gravity-compensated"))
    return tuple(keys)


def object_key(name: str, rate_hz: float) -> ObsKey:
    return ObsKey(f"state.object.{name}", (7,), rate_hz=rate_hz, frame="base", sim_only=True,
                  description="privileged pose xyz + quaternion wxyz")


def image_key(cam: Camera, rate_hz: float | None = None) -> ObsKey:
    return ObsKey(f"image.{cam.name}", (cam.height, cam.width, 3), dtype="uint8",
                  rate_hz=rate_hz or cam.rate_hz, frame=f"camera:{cam.name}")
