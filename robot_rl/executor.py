"""Action chunks → absolute, time-stamped end-effector targets (ARCHITECTURE.md, action semantics).
Plain Python: `action_executor` (node) wraps it; the sim env applies the same rule in-process.

A delta composes on the *commanded* target (`target_k = clip(target_{k-1} ∘ Δ_k)`), which resets to
the measured pose at episode start and whenever control changes hands. Action k of a chunk observed
at t_obs is stamped t_obs + (k+1)·dt; a target whose time has passed is composed but not sent
(skipped, never shifted).

Overlapping chunks (planned ahead): by default the newer chunk's targets replace the older one's tail.
With `ensemble_decay` = m ≥ 0, temporal ensembling (ACT, Zhao et al. 2023): every target time is the
weighted mean of all chunks' predictions for it, prediction i (0 = the oldest) weighted exp(-m·i) —
positions and gripper averaged, rotations interpolated on SO(3). The chunk's own deltas still chain
on its own predictions; what is sent (and what a later chunk starts from) is the ensembled target.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from robot_rl.drivers.safety import stamp_problem
from robot_rl.geometry import apply_delta, quat_to_rot, rot_to_quat

MAX_STEP_M = 1.0  # a delta longer than this per policy step is garbage, not an action


def chunk_problem(t_obs: float, now: float, chunk: list[tuple[float, np.ndarray, float | None]]) -> str:
    """'' or why a chunk of delta poses (xyz + wxyz) is garbage: non-finite values, a translation
    longer than MAX_STEP_M, a quaternion that is not unit, a time more than MAX_LEAD_S ahead."""
    if stamp_problem(t_obs, now) not in ("", "late"):
        return stamp_problem(t_obs, now)
    for k, (t, d, g) in enumerate(chunk):
        if not (np.isfinite(t) and np.all(np.isfinite(d)) and (g is None or np.isfinite(g))):
            return f"action {k} is not finite"
        if np.linalg.norm(d[:3]) > MAX_STEP_M:
            return f"action {k} moves {np.linalg.norm(d[:3]):.3g} m in one step (limit {MAX_STEP_M:g} m)"
        if not 0.9 < np.linalg.norm(d[3:]) < 1.1:
            return f"action {k} rotation quaternion has norm {np.linalg.norm(d[3:]):.3g}, not 1"
    return ""


@dataclass
class ChunkExecutor:
    workspace_low: tuple[float, float, float]
    workspace_high: tuple[float, float, float]
    dt: float
    target: np.ndarray | None = None
    late: int = 0  # targets skipped because their time had passed (deadline misses)
    composed: int = 0  # targets composed in all
    chunks: int = 0
    ensembled: int = 0  # targets blended from more than one chunk's prediction
    ensemble_decay: float | None = None  # None: a newer chunk replaces the tail; m >= 0: temporal ensembling
    history: deque = field(default_factory=lambda: deque(maxlen=64))  # (stamp, target, gripper, weight, n)

    def __post_init__(self):
        if self.ensemble_decay is not None and not (np.isfinite(self.ensemble_decay) and self.ensemble_decay >= 0):
            raise ValueError(f"executor: ensemble_decay {self.ensemble_decay} must be a finite number >= 0 "
                             "(or None: no temporal ensembling)")

    def _base(self, t_obs: float) -> np.ndarray:
        """The commanded target at the observation time: a chunk planned ahead (before the previous one
        ran out) composes from there, and its targets replace the previous chunk's tail."""
        for stamp, target, *_ in reversed(self.history):
            if stamp <= t_obs + 1e-9:
                return target.copy()
        return self.target.copy()

    def _ensemble(self, earlier: dict, stamp: float, target: np.ndarray, gripper: float | None):
        """This chunk's prediction for `stamp` blended into the earlier chunks' (ensembled) one."""
        if stamp not in earlier:
            return target, gripper, 1.0, 1
        old, old_g, weight, n = earlier[stamp]
        w = float(np.exp(-self.ensemble_decay * n))
        a = w / (weight + w)
        out = target.copy()
        out[:3] = (1 - a) * old[:3] + a * target[:3]
        r_old = quat_to_rot(old[3:])
        out[3:] = rot_to_quat(r_old * (r_old.inv() * quat_to_rot(target[3:])) ** a)
        if gripper is not None and old_g is not None:
            gripper = (1 - a) * old_g + a * gripper
        self.ensembled += 1
        return out, gripper, weight + w, n + 1

    def reset(self, measured_pose: np.ndarray) -> None:
        """Control (re)starts here: the commanded target is the measured pose."""
        self.target = np.asarray(measured_pose, dtype=np.float64).copy()
        self.history.clear()

    def execute(self, t_obs: float, deltas: list[tuple[np.ndarray, np.ndarray, float | None]], now: float,
                ) -> list[tuple[float, np.ndarray, float | None]]:
        """Compose a chunk's executed deltas onto the commanded target; the targets still ahead of `now`."""
        if self.target is None:
            raise RuntimeError("executor: no measured pose yet (reset() at episode start)")
        out = []
        lo, hi = np.asarray(self.workspace_low), np.asarray(self.workspace_high)
        chain = self._base(t_obs)
        earlier = {}  # the previous chunks' targets after t_obs: replaced, or ensembled with this chunk's
        while self.history and self.history[-1][0] > t_obs + 1e-9:
            entry = self.history.pop()
            earlier[round(entry[0], 6)] = entry[1:]
        for k, (dpos, drot, gripper) in enumerate(deltas):
            chain = apply_delta(chain, dpos, drot)
            chain[:3] = np.clip(chain[:3], lo, hi)
            stamp = t_obs + (k + 1) * self.dt
            target, g, weight, n = (chain.copy(), gripper, 1.0, 1) if self.ensemble_decay is None else \
                self._ensemble(earlier, round(stamp, 6), chain, gripper)
            self.history.append((stamp, target, g, weight, n))
            earlier.pop(round(stamp, 6), None)
            self.target = target
            self.composed += 1
            if stamp <= now:
                self.late += 1
                continue
            out.append((stamp, target.copy(), g))
        if self.ensemble_decay is not None:  # an earlier chunk reaching further than this one: its tail stays
            for stamp, entry in sorted(earlier.items()):
                self.history.append((stamp, *entry))
                if stamp > now:
                    out.append((stamp, entry[0].copy(), entry[1]))
        self.chunks += 1
        return out
