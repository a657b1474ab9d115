"""External gymnasium envs through the same adapter: Meta-World v3 (with its expert) and gym-hil."""

import numpy as np
from robot_rl.sim import make_env, make_expert

from robot_rl.rollout import RandomPolicy, run_episodes


def test_metaworld_push_with_its_scripted_expert():
    env = make_env("metaworld/push-v3")
    spec = env.robot_spec
    assert spec.keys() == ["state.env"] and spec.key("state.env").sim_only
    assert spec.action.mask == (True, True, True, False, False, False, True)
    s = run_episodes(env, make_expert(env), episodes=3, seed=0, task="metaworld/push-v3", policy_name="scripted",
                     progress=False)
    assert s.successes == 3
    env.close()


def test_gym_hil_pick_cube_through_the_adapter():
    env = make_env("gym_hil/PandaPickCubeBase-v0")
    obs, _ = env.reset(seed=0)
    env.robot_spec.check_observation(obs)
    assert obs["state.env"].shape == (21,)
    p = RandomPolicy(env)
    p.reset(np.random.default_rng(0))
    obs, r, term, trunc, info = env.step(p.act(obs))
    assert "success" in info
    env.close()
