"""A writer process for the crash tests: episode k's content is a pure function of k, so the
parent can check every committed episode byte for byte after killing this process."""

from __future__ import annotations

import sys
import time

import numpy as np

from robot_rl.spec import ActionSpec, Camera, ObsKey, RobotSpec, image_key

CAM = Camera("cam", 16, 12, 16, 12)
SPEC = RobotSpec(name="crash", observations=(ObsKey("state.q", (3,)), ObsKey("state.ee_pose", (7,)), image_key(CAM)),
                 action=ActionSpec(), cameras=(CAM,))


def episode(k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(k)
    n = int(rng.integers(3, 30))
    return {
        "state.q": rng.normal(size=(n, 3)).astype(np.float32),
        "state.ee_pose": rng.normal(size=(n, 7)).astype(np.float32),
        "image.cam": smooth_frames(rng, n),
        "action": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
        "timestamp": 1000.0 * k + 0.1 * np.arange(n),
        "reward": rng.normal(size=n).astype(np.float32),
        "intervention": rng.random(n) < 0.3,
    }


def smooth_frames(rng: np.random.Generator, n: int) -> np.ndarray:
    """Camera-like frames (gradients and a moving square), so lossy codecs can be checked by PSNR."""
    y, x = np.mgrid[0:12, 0:16]
    frames = np.empty((n, 12, 16, 3), np.uint8)
    base = rng.uniform(40, 200, 3)
    for t in range(n):
        img = base + 3.0 * x[..., None] + 2.0 * y[..., None] * rng.uniform(0.5, 1.5, 3)
        cx = (t * 2) % 12
        img[2:6, cx:cx + 4] = rng.uniform(0, 255, 3)
        frames[t] = np.clip(img, 0, 255)
    return frames


def main(path: str, n_max: int, delay: float) -> None:
    from robot_rl.store import EpisodeWriter

    w = EpisodeWriter(path, SPEC, image_codec=sys.argv[4] if len(sys.argv) > 4 else "blosc_zstd")
    print("ready", w.n_episodes, flush=True)

    while w.n_episodes < n_max:
        k = w.n_episodes
        ep = episode(k)
        w.begin_episode("teleop", task="crash", operator=f"op{k % 3}")
        for t in range(len(ep["action"])):
            w.add_step({key: ep[key][t] for key in SPEC.keys()}, ep["action"][t], timestamp=float(ep["timestamp"][t]),
                       reward=float(ep["reward"][t]), intervention=bool(ep["intervention"][t]),
                       terminated=t == len(ep["action"]) - 1)
            if delay:
                time.sleep(delay)
        w.end_episode(success=bool(k % 2))
        print("committed", k, flush=True)
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
