"""Action chunks → absolute, time-stamped end-effector targets (ARCHITECTURE.md, action semantics).
Plain Python: `action_executor` (node) wraps it; the sim env applies the same rule in-process.

A delta composes on the *commanded* target (`target_k = clip(target_{k-1} ∘ Δ_k)`), which resets to
the measured pose at episode start and whenever control changes hands. Action k of a chunk observed
at t_obs is stamped t_obs + (k+1)·dt; a target whose time has passed is composed but not sent
(skipped, never shifted).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from robot_rl.drivers.safety import stamp_problem
from robot_rl.geometry import apply_delta

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
    history: deque = field(default_factory=lambda: deque(maxlen=64))  # (stamp, target) composed so far

    def _base(self, t_obs: float) -> np.ndarray:
        """The commanded target at the observation time: a chunk planned ahead (before the previous one
        ran out) composes from there, and its targets replace the previous chunk's tail."""
        for stamp, target in reversed(self.history):
            if stamp <= t_obs + 1e-9:
                return target.copy()
        return self.target.copy()

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
        self.target = self._base(t_obs)
        while self.history and self.history[-1][0] > t_obs + 1e-9:
            self.history.pop()  # replaced by this chunk
        for k, (dpos, drot, gripper) in enumerate(deltas):
            self.target = apply_delta(self.target, dpos, drot)
            self.target[:3] = np.clip(self.target[:3], lo, hi)
            stamp = t_obs + (k + 1) * self.dt
            self.history.append((stamp, self.target.copy()))
            self.composed += 1
            if stamp <= now:
                self.late += 1
                continue
            out.append((stamp, self.target.copy(), gripper))
        self.chunks += 1
        return out
