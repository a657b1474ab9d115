"""The Franka backend's 1 kHz torque loop against `franka-sim` on the real FCI protocol (communication
constraints enforced: 20 lost command cycles abort the motion), following a moving target stream (a
2 cm circle, targets at 10 Hz, so the loop interpolates every cycle). Side by side in one run, the
same loop and control law with its rotation algebra done two ways:

- scipy: every rotation through scipy's `Rotation` (the loop before commit 5be12ad);
- lean:  robot_rl.geometry's quaternion functions (what drivers/franka.py runs).

Per variant: compute time per cycle (control law + command, after readOnce returns), the share of
cycles whose state came more than 1.5 ms after the previous one (the loop missed a state), and
the communication reflexes (each is recovered and the loop goes on).

    python benchmarks/control_loop.py [--seconds 10]
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIM_VENV = ROOT / ".venv-franka-sim"


def scipy_algebra() -> ExitStack:
    """Patch the loop's rotation algebra back to scipy's Rotation (the baseline)."""
    from scipy.spatial.transform import Rotation

    from robot_rl.drivers import franka, targets
    from robot_rl.geometry import quat_to_rot, rot_to_quat

    def pose(o_t_ee):
        m = np.asarray(o_t_ee).reshape(4, 4).T
        return np.concatenate([m[:3, 3], rot_to_quat(Rotation.from_matrix(m[:3, :3]))])

    def interpolate(a, b, frac):
        out = np.empty(7)
        out[:3] = a[:3] + frac * (b[:3] - a[:3])
        dr = (quat_to_rot(b[3:]) * quat_to_rot(a[3:]).inv()).as_rotvec()
        out[3:] = rot_to_quat(Rotation.from_rotvec(frac * dr) * quat_to_rot(a[3:]))
        return out

    stack = ExitStack()
    for target, name, fn in ((franka, "_pose", pose), (targets, "interpolate", interpolate),
                             (franka, "quat_mul", lambda a, b: rot_to_quat(quat_to_rot(a) * quat_to_rot(b))),
                             (franka, "quat_conj", lambda q: rot_to_quat(quat_to_rot(q).inv())),
                             (franka, "quat_log", lambda q: quat_to_rot(q).as_rotvec())):
        stack.enter_context(mock.patch.object(target, name, fn))
    return stack


def run(robot, model, seconds: float) -> dict:
    import pylibfranka as pf

    from robot_rl.drivers.franka import FrankaSettings, _Controller, _pose
    from robot_rl.drivers.safety import SafetyLimits

    limits = SafetyLimits(workspace_low=(0.2, -0.4, 0.1), workspace_high=(0.8, 0.4, 0.9), max_tilt_rad=1.0)
    compute, late, reflexes = [], 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ctl = _Controller(FrankaSettings("127.0.0.1", max_pos_error=0.02, max_rot_error=0.1), limits)
        centre, next_target = _pose(robot.read_once().O_T_EE), 0.0
        ctrl = robot.start_torque_control()
        try:
            while time.monotonic() < end:
                state, period = ctrl.readOnce()
                t0 = time.perf_counter()
                now = time.time()
                if now >= next_target:  # the executor's stream: a 2 cm circle at 10 Hz, 0.15 s ahead
                    goal = centre.copy()
                    goal[:2] += 0.02 * np.array([np.cos(now), np.sin(now)]) - [0.02, 0.0]
                    ctl.targets.add(now, now + 0.15, goal, None, ctl.ref if ctl.ref is not None else centre, 1e-3)
                    next_target = now + 0.1
                ctrl.writeOnce(pf.Torques(ctl.torque(state, model, now, max(period.to_sec(), 1e-3)).tolist()))
                compute.append(time.perf_counter() - t0)
                late += period.to_sec() > 1.5e-3
        except pf.ControlException:
            reflexes += 1
            del ctrl
            robot.automatic_error_recovery()
            continue
        del ctrl  # (libfranka allows one active control at a time)
        robot.stop()
    c = np.asarray(compute) * 1e3
    return {"cycles": len(c), "compute_mean_ms": round(float(c.mean()), 3),
            "compute_p99_ms": round(float(np.percentile(c, 99)), 3),
            "late_cycles_pct": round(100.0 * late / max(1, len(c)), 2), "reflexes": reflexes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    server = SIM_VENV / "bin" / "run-franka-sim-server"
    if not server.exists():
        raise SystemExit(f"control_loop: {server} is missing; `make franka-sim` creates it")
    mjcf = next((SIM_VENV / "lib").glob("python3*/site-packages/gym_hil/assets/panda.xml"))
    log = open(os.devnull, "w")
    sim = subprocess.Popen([str(server), "--enforce-comm-constraints"], env={**os.environ, "FR3_MJCF": str(mjcf)},
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import pylibfranka as pf

        deadline = time.monotonic() + 60
        while True:
            try:
                robot = pf.Robot("127.0.0.1", pf.RealtimeConfig.kIgnore)
                break
            except pf.NetworkException:
                if time.monotonic() > deadline:
                    raise SystemExit("control_loop: franka-sim did not come up within 60 s") from None
                time.sleep(0.5)
        model = robot.load_model()
        figures = {}
        with scipy_algebra():
            figures["scipy"] = run(robot, model, args.seconds)
        figures["lean"] = run(robot, model, args.seconds)
    finally:
        sim.terminate()
        sim.wait(10)
    emit("control_loop", figures, f"python benchmarks/control_loop.py --seconds {args.seconds:g}")


if __name__ == "__main__":
    main()
