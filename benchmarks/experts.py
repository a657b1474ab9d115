"""Scripted expert success over 100 seeded episodes per task (+ Meta-World push-v3), with Wilson
95 % intervals; reach_around also reports how often each solution was used. Baseline in the same
run: a uniform random policy on the same seeds (10 episodes per task).

    python benchmarks/experts.py [--episodes 100]
"""

from __future__ import annotations

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402
from robot_rl.sim import TASKS, make_env, make_expert  # noqa: E402

from robot_rl.rollout import RandomPolicy, run_episodes  # noqa: E402

SEED = 10_000  # demonstration seeds elsewhere start at 0; evaluation seeds are kept disjoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=100)
    args = ap.parse_args()
    out: dict[str, object] = {}
    for task in [*TASKS, "metaworld/push-v3"]:
        env = make_env(task)
        s = run_episodes(env, make_expert(env), args.episodes, SEED, task, "scripted", progress=False)
        r = run_episodes(env, RandomPolicy(env), 10, SEED, task, "random", progress=False)
        env.close()
        out[f"{task}.expert_success"] = round(s.success_rate, 3)
        out[f"{task}.expert_ci95"] = [round(x, 3) for x in s.ci95]
        out[f"{task}.episodes"] = s.episodes
        out[f"{task}.random_success"] = round(r.success_rate, 3)
        out[f"{task}.mean_length"] = round(sum(s.lengths) / len(s.lengths), 1)
        for sol, n in s.solutions.items():
            out[f"{task}.solution_{sol}"] = round(n / s.episodes, 3)
        print(task, {k.split(".", 1)[1]: v for k, v in out.items() if k.startswith(task + ".")}, file=sys.stderr)
    emit("experts", out, f"python benchmarks/experts.py --episodes {args.episodes}")


if __name__ == "__main__":
    main()
