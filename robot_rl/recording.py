"""What the `recorder` node writes for each policy step, in plain Python (no rclpy): the streams of
the graph aligned to step times `t_k = t_0 + k·dt`.

- **observation** at `t_k`: per key the sample nearest to `t_k` within its tolerance; when there is
  none (a late or lost frame) the closest other sample is used and counted as a dropped sample of
  that key — counted and reported, never silent.
- **executed action** of step k: the delta from the commanded target in force at `t_k` to the one in
  force at `t_{k+1}` (the newest target sent to the arm stamped at or before that time; the
  commanded target starts at the measured pose, and a safety hold makes the measured pose at its
  time the commanded target), as the normalised ee_delta action of the task
  (`robot_rl.geometry.delta_to_action`, the inverse of what the env and the executor apply), so a
  replay through `env.step` follows the same targets.
- **proposed action**: the same from the policy's targets (`policy/target`), NaN where the policy
  proposed nothing for the step.
- **intervention**: a human was in control at `t_k`, or took it before `t_{k+1}`.
- **reward**: the newest task reward stamped at or before `t_{k+1}`.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from robot_rl.geometry import delta_between, delta_to_action


def nearest(buf, t: float, tol: float):
    """The (stamp, value) in a time-ordered buffer nearest to time t within tol, or None."""
    best = None
    for stamp, value in reversed(buf):
        if abs(stamp - t) <= tol and (best is None or abs(stamp - t) < abs(best[0] - t)):
            best = (stamp, value)
        if stamp < t - tol:
            break
    return best


def _at_or_before(buf: deque, t: float, eps: float = 1e-6):
    """The newest (stamp, value) with stamp <= t (+eps), or None."""
    for stamp, value in reversed(buf):
        if stamp <= t + eps:
            return stamp, value
    return None


@dataclass
class Step:
    obs: dict
    action: np.ndarray
    action_policy: np.ndarray
    intervention: bool
    reward: float
    stamp: float


class StepAssembler:
    """One episode's alignment. Feed samples as they arrive; `ready_steps` yields complete steps."""

    def __init__(self, t0: float, dt: float, obs: dict[str, deque], tol: dict[str, float], scale, mask,
                 start_pose: np.ndarray, start_gripper: float = -1.0, history: int = 512):
        """`obs`: per key a time-ordered buffer of (stamp, value) (shared with whoever fills it)."""
        self.t0, self.dt, self.obs, self.keys, self.tol = t0, dt, obs, list(obs), dict(tol)
        self.scale, self.mask = np.asarray(scale, dtype=np.float64), np.asarray(mask, dtype=bool)
        self.executed: deque = deque(maxlen=history)  # (stamp, (pose, gripper)) sent to the arm
        self.proposed: deque = deque(maxlen=history)  # (stamp, (pose, gripper)) from the policy
        self.flags: deque = deque(maxlen=history)  # (stamp, human)
        self.rewards: deque = deque(maxlen=history)  # (stamp, reward)
        self.k = 0
        self.commanded = (np.asarray(start_pose, dtype=np.float64), float(start_gripper))
        self.dropped: Counter = Counter()  # per key: steps recorded with a sample other than the one due
        self.dropped_steps: list[int] = []  # which steps
        self.clipped = 0  # executed actions beyond the action bounds (clipped into them)

    # ---- inputs (time-ordered per stream) ---------------------------------------------------------
    def add_target(self, stamp: float, pose: np.ndarray, gripper: float | None, executed: bool = True) -> None:
        buf = self.executed if executed else self.proposed
        while buf and buf[-1][0] >= stamp - 1e-9:  # a newer plan replaces the overlapping tail (as the arm does)
            buf.pop()
        buf.append((stamp, (np.asarray(pose, dtype=np.float64), gripper)))

    def add_hold(self, stamp: float) -> None:
        """The arm was told to hold its measured pose at `stamp` (safety filter): from then on that pose
        is the commanded target, and the next plan starts from it — not from the target it cut short."""
        poses = self.obs.get("state.ee_pose")
        if poses:
            hit = _at_or_before(poses, stamp) or poses[0]
            self.add_target(stamp, hit[1], None, executed=True)

    def add_flag(self, stamp: float, human: bool) -> None:
        self.flags.append((stamp, bool(human)))

    def add_reward(self, stamp: float, reward: float) -> None:
        self.rewards.append((stamp, float(reward)))

    # ---- steps ------------------------------------------------------------------------------------
    def step_time(self, k: int) -> float:
        return round(self.t0 + k * self.dt, 9)

    def _observation(self, t: float, final: bool) -> dict | None:
        """The observation at t, or None while a key may still deliver a sample near t. A key with
        no sample near t (late, lost, or a stream that started after t) gets its newest older
        sample, else its oldest newer one, and the step counts as dropped for that key."""
        obs, late = {}, []
        for k in self.keys:
            buf = self.obs[k]
            hit = nearest(buf, t, self.tol[k])
            if hit is None:
                if not buf or not (buf[-1][0] > t + self.tol[k] or final):
                    return None
                hit = _at_or_before(buf, t) or next(s for s in buf if s[0] > t)
                late.append(k)
            obs[k] = hit[1]
        self.dropped.update(late)
        if late:
            self.dropped_steps.append(self.k)
        return obs

    def _action(self, prev: tuple[np.ndarray, float], nxt: tuple[np.ndarray, float | None]) -> tuple[np.ndarray, bool]:
        pose, gripper = nxt
        return delta_to_action(delta_between(prev[0], pose), prev[1] if gripper is None else gripper,
                               self.scale, self.mask)

    def _target_at(self, buf: deque, t: float, default):
        hit = _at_or_before(buf, t)
        if hit is None:
            return default
        pose, gripper = hit[1]
        return pose, (default[1] if default is not None and gripper is None else gripper)

    def ready_steps(self, measured_until: float, final: bool = False) -> list[Step]:
        """The steps that are complete: the arm state has gone past the step's end (`measured_until`),
        so every target for it has been sent. `final`: the episode ended, flush what can be."""
        out = []
        while True:
            t, t1 = self.step_time(self.k), self.step_time(self.k + 1)
            if measured_until < t1 - 1e-9 and not (final and measured_until >= t - 1e-9):
                break
            obs = self._observation(t, final)
            if obs is None:
                break
            prev = self.commanded
            nxt = self._target_at(self.executed, t1, prev)
            action, clipped = self._action(prev, nxt)
            self.clipped += int(clipped)
            self.commanded = (nxt[0], prev[1] if nxt[1] is None else float(nxt[1]))
            proposed = np.full(7, np.nan)
            p_next = _at_or_before(self.proposed, t1)
            if p_next is not None and p_next[0] > t + 1e-9:  # the policy proposed a target for this step
                proposed, _ = self._action(self._target_at(self.proposed, t, prev), p_next[1])
            state = _at_or_before(self.flags, t)
            human = bool(state and state[1]) or any(h for s, h in self.flags if t < s < t1)
            reward = _at_or_before(self.rewards, t1)
            out.append(Step(obs, action.astype(np.float32), proposed.astype(np.float32), human,
                            reward[1] if reward else 0.0, t))
            self.k += 1
        return out
