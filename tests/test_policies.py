"""Policies: diffusers samplers, checkpoints (safetensors + JSON, verified), per-frame image
encoding, and small real training runs: the loss falls and the policy beats random on `reach`;
distillation yields a one-step student."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from robot_rl.policies.checkpoint import CheckpointError, load_policy, save_policy
from robot_rl.policies.consistency import ConsistencyPolicy
from robot_rl.policies.diffusion import DiffusionPolicy, PolicyConfig
from robot_rl.policies.normalizer import Normalizer
from robot_rl.sim import make_env, make_expert

from robot_rl.learning.evaluate import ChunkAgent, evaluate
from robot_rl.learning.pipeline import sampler_gap
from robot_rl.learning.train import LoopConfig, distill, train_diffusion
from robot_rl.rollout import EpisodeRecorder, RandomPolicy, run_episodes
from robot_rl.spec import SpecError, check_compatible

SMALL = {"down_dims": (32, 64, 128), "step_embed_dim": 64}


def tiny_policy(image_keys=(), cls=DiffusionPolicy, **cfg_overrides) -> DiffusionPolicy:
    cfg = PolicyConfig(state_keys=("state.ee_pose",), image_keys=image_keys, state_dims={"state.ee_pose": 7},
                       image_crop=28, **SMALL, **cfg_overrides)
    stats = {"state.ee_pose": {"min": [-1] * 7, "max": [1] * 7}, "action": {"min": [-1] * 7, "max": [1] * 7}}
    return cls(cfg, Normalizer.from_stats(stats, ["state.ee_pose", "action"]))


def test_samplers_come_from_diffusers_and_respect_bounds():
    p = tiny_policy()
    batch = {"state.ee_pose": torch.zeros(2, 2, 7)}
    for name, cls in (("ddpm100", "DDPMScheduler"), ("ddim10", "DDIMScheduler"), ("dpm10", "DPMSolverMultistepScheduler")):
        kind, steps = name[:-2].rstrip("0123456789") or name, int("".join(c for c in name if c.isdigit()))
        assert type(p.scheduler(name.rstrip("0123456789"), steps)).__name__ == cls
        a = p.predict_action(batch, name, torch.Generator().manual_seed(0))
        assert a.shape == (2, 16, 7) and a.abs().max() <= 1.0 + 1e-6
        del kind
    with pytest.raises(ValueError, match="consistency"):
        p.predict_action(batch, "cm1")
    s = tiny_policy(cls=ConsistencyPolicy)
    for name in ("cm1", "cm3"):
        assert s.predict_action(batch, name).shape == (2, 16, 7)
    with pytest.raises(ValueError, match="sampler 'fast'"):
        s.predict_action(batch, "fast")


def test_padded_steps_train_only_with_loss_on_padding():
    """Padded action steps (past an episode's end) are skipped by default; `loss_on_padding` trains on
    them too. With the network's output held at zero the loss is the mean squared noise over the
    steps it counts: 10 of 16 here by default, all 16 with the option."""
    batch = {"state.ee_pose": torch.zeros(4, 2, 7), "action": torch.zeros(4, 16, 7),
             "action_is_pad": torch.zeros(4, 16, dtype=torch.bool)}
    batch["action_is_pad"][:, 10:] = True
    torch.manual_seed(0)
    noise_sq = torch.randn(4, 16, 7) ** 2
    for on_padding, expected in ((False, noise_sq[:, :10].mean()), (True, noise_sq.mean())):
        p = tiny_policy(loss_on_padding=on_padding)
        p.net.forward = lambda x, t, cond: torch.zeros_like(x)
        torch.manual_seed(0)
        assert float(p.compute_loss(batch)) == pytest.approx(float(expected), rel=1e-5), on_padding


def test_checkpoint_round_trip_is_exact_and_verified(tmp_path):
    p = tiny_policy().eval()
    subset = {"observations": [{"name": "state.ee_pose", "shape": [7], "dtype": "float32", "sim_only": False}],
              "action": {"kind": "ee_delta", "names": ["x", "y", "z", "rx", "ry", "rz", "gripper"]}}
    save_policy(p, tmp_path / "ck", subset, {"task": "reach"})
    assert {f.name for f in (tmp_path / "ck").iterdir()} == {"model.safetensors", "config.json"}
    q = load_policy(tmp_path / "ck")
    noise = torch.randn(1, 16, 7)
    batch = {"state.ee_pose": torch.randn(1, 2, 7)}
    cond = p.condition(batch)
    again = q.sample_normalized(q.condition(batch), "ddim10", noise=noise)
    assert torch.equal(p.sample_normalized(cond, "ddim10", noise=noise), again)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(CheckpointError, match="sha256"):
        load_policy(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_policy(tmp_path)


def test_each_camera_frame_is_encoded_once():
    p = tiny_policy(image_keys=("image.front",))
    agent = ChunkAgent(p, "ddim10", n_action_steps=1)  # re-plan every step: windows overlap
    agent.reset(np.random.default_rng(0))
    for t in range(5):
        agent.act({"state.ee_pose": np.zeros(7, np.float32), "image.front": np.full((32, 32, 3), t, np.uint8)})
    assert agent.encoded_frames == 5  # not 2 per plan


def _rollout(agents, steps=6):
    """Each agent's actions over `steps` steps, all agents stepping together (act_batch)."""
    from robot_rl.learning.evaluate import act_batch

    for k, a in enumerate(agents):
        a.reset(np.random.default_rng(k))
    out = []
    for t in range(steps):
        obs = [{"state.ee_pose": np.full(7, 0.1 * t + k, np.float32), "image.front": np.full((32, 32, 3), t + 7 * k, np.uint8)}
               for k in range(len(agents))]
        out.append(act_batch(agents, obs))
    return np.array(out)  # (steps, agents, action_dim)


def test_robots_planned_in_one_batch_get_the_chunks_they_would_get_alone():
    """The policy server's batching: a robot's chunk depends on its own window and noise only."""
    p = tiny_policy(image_keys=("image.front",), cls=ConsistencyPolicy)
    together = _rollout([ChunkAgent(p, "cm1", n_action_steps=2) for _ in range(3)])
    alone = _rollout([ChunkAgent(p, "cm1", n_action_steps=2)])
    np.testing.assert_allclose(together[:, :1], alone, atol=1e-5)
    assert np.abs(together[:, 0] - together[:, 1]).max() > 1e-3, "robots with other observations act differently"
    pair = _rollout([ChunkAgent(p, "cm1", n_action_steps=2) for _ in range(2)])  # batches of two instead of three
    np.testing.assert_allclose(pair, together[:, :2], atol=1e-5)


@pytest.mark.parametrize("sampler", ["cm3", "ddpm100"])
def test_a_lone_agents_stochastic_sampler_repeats_from_its_seed(sampler):
    """cm3's re-noising and DDPM's steps draw from the agent's own generator: the same seed gives the
    same actions whatever else drew random numbers in between (several samplers evaluated in one run)."""
    p = tiny_policy(cls=ConsistencyPolicy)
    first = _rollout([ChunkAgent(p, sampler, n_action_steps=2)])
    torch.randn(1000)  # the global generator moves on
    np.testing.assert_array_equal(_rollout([ChunkAgent(p, sampler, n_action_steps=2)]), first)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_autocast_stays_close_to_fp32_on_the_cpu(precision):
    """The GPU half-precision flag, checked on the CPU: same chunks to within half-precision error."""
    p = tiny_policy(image_keys=("image.front",), cls=ConsistencyPolicy)
    ref = _rollout([ChunkAgent(p, "cm1", n_action_steps=2)])
    half = _rollout([ChunkAgent(p, "cm1", n_action_steps=2, precision=precision)])
    assert 0 < np.abs(half - ref).max() < 0.05, f"{precision} drifts {np.abs(half - ref).max():.3f} from fp32"
    assert np.isfinite(half).all()
    with pytest.raises(ValueError, match="precision 'fp8'"):
        ChunkAgent(p, "cm1", precision="fp8")


def test_torch_compile_gives_the_eager_chunks_on_the_cpu():
    """The compile flag (inductor on the CPU here; CUDA graphs with reduce-overhead on a GPU)."""
    import copy

    from robot_rl.learning.evaluate import accelerate

    p = tiny_policy(image_keys=("image.front",), cls=ConsistencyPolicy)
    ref = _rollout([ChunkAgent(p, "cm1", n_action_steps=2) for _ in range(2)])
    compiled = accelerate(copy.deepcopy(p), "default")
    assert type(compiled.net).__name__ == "OptimizedModule"
    np.testing.assert_allclose(_rollout([ChunkAgent(compiled, "cm1", n_action_steps=2) for _ in range(2)]), ref, atol=1e-4)
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        accelerate(p, "fast")


@pytest.fixture(scope="module")
def reach_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("reach") / "reach.zarr"
    env = make_env("reach")
    rec = EpisodeRecorder(path, env.robot_spec, "reach")
    run_episodes(env, make_expert(env), 60, 0, "reach", "scripted", progress=False, recorder=rec)
    rec.close()
    from robot_rl.store.tools import prepare

    prepare(path)
    return path


def test_training_lowers_the_loss_and_beats_random_on_reach(reach_store, tmp_path):
    loop = LoopConfig(steps=1200, batch_size=128, lr=1e-3, warmup_steps=50, eval_episodes=0, ckpt_every=0, log_every=50)
    policy, hist = train_diffusion([str(reach_store)], tmp_path / "teacher", dict(SMALL), loop, task="reach",
                                   progress=False)
    assert hist.loss[-1] < 0.3 * hist.loss[0], hist.loss
    cfg = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert cfg["train_seeds"] == [0, 59] and cfg["spec_subset"]["observations"]
    env = make_env("reach")
    learned = evaluate(policy, env, "reach", 20, 100_000, "ddim10")
    rnd = run_episodes(env, RandomPolicy(env), 20, 100_000, "reach", "random", progress=False)
    print("teacher", learned.successes, "random", rnd.successes)
    assert learned.successes >= rnd.successes + 4, (learned.to_dict(), rnd.successes)
    # distillation: a one-step student that still solves the task
    loop_d = LoopConfig(steps=200, batch_size=128, lr=3e-4, warmup_steps=20, eval_episodes=0, ckpt_every=0, log_every=20)
    student, dh = distill(tmp_path / "teacher", tmp_path / "student", loop_d, skip=20, progress=False)
    assert student.kind == "consistency" and dh.loss[-1] <= dh.loss[0]
    # noise for noise, the one-step chunk moved closer to the teacher's DDIM chunk (executed steps, xyz)
    warm = ConsistencyPolicy(student.cfg, student.normalizer)
    warm.load_state_dict(policy.state_dict())
    gaps = [sampler_gap(s, policy, [str(reach_store)], teacher_sampler="ddim5") for s in (warm, student)]
    print("cm1 vs teacher ddim5, warm start / distilled", gaps)
    assert gaps[1] < 0.95 * gaps[0], gaps
    one = evaluate(student, env, "reach", 20, 100_000, "cm1")
    three = evaluate(student, env, "reach", 20, 100_000, "cm3")
    print("student cm1", one.successes, "cm3", three.successes)
    assert three.successes >= rnd.successes + 3 and one.successes >= rnd.successes, (one.to_dict(), three.to_dict())


def test_training_depends_on_its_seed_not_on_what_ran_before(reach_store, tmp_path):
    loop = LoopConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, eval_episodes=0, ckpt_every=0, log_every=1)
    runs = []
    for i, burn in enumerate((0, 1000)):
        torch.rand(burn)  # another test drew from the global generator first
        p, _ = train_diffusion([str(reach_store)], tmp_path / str(i), dict(SMALL), loop, progress=False)
        runs.append(p.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_resume_continues_from_the_last_checkpoint(reach_store, tmp_path):
    loop = LoopConfig(steps=20, batch_size=16, lr=1e-3, warmup_steps=2, eval_episodes=0, ckpt_every=10, log_every=5)
    _, first = train_diffusion([str(reach_store)], tmp_path / "t", dict(SMALL), loop, progress=False)
    state = json.loads((tmp_path / "t" / "last" / "train_state.json").read_text())
    assert state["step"] == 20 and first.steps[-1] == 20
    longer = LoopConfig(**{**loop.__dict__, "steps": 30})
    _, resumed = train_diffusion([str(reach_store)], tmp_path / "t", dict(SMALL), longer, progress=False, resume=True)
    assert resumed.steps[:4] == first.steps[:4] and resumed.steps[-1] == 30  # history carried over, 10 more steps
    assert first.timed_steps == 20 and resumed.timed_steps == 30  # the stage's clock sums the two runs
    assert 0 < first.train_s < resumed.train_s
    assert json.loads((tmp_path / "t" / "config.json").read_text())["step"] == 30


def test_eval_records_policy_rollouts(reach_store, tmp_path):
    p = tiny_policy()
    from robot_rl.store import EpisodeStore

    env = make_env("reach")
    subset = env.robot_spec.policy_subset(["state.ee_pose"])
    save_policy(p, tmp_path / "ck", subset, {"task": "reach"})
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "eval", f"ckpt={tmp_path / 'ck'}", "task=reach",
                        "episodes=3", "video=false", "record=pol.zarr", "progress=false"], capture_output=True, text=True,
                       env={**os.environ, "MUJOCO_GL": "egl"}, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    st = EpisodeStore(tmp_path / "pol.zarr")
    assert st.n_episodes == 3 and {m["source"] for m in st.meta} == {"policy"}


def test_eval_refuses_a_checkpoint_the_env_cannot_feed(reach_store, tmp_path):
    p = tiny_policy()
    subset = {"observations": [{"name": "state.object.cube", "shape": [7], "dtype": "float32", "sim_only": True}],
              "action": {"kind": "ee_delta", "names": ["x", "y", "z", "rx", "ry", "rz", "gripper"]}}
    save_policy(p, tmp_path / "ck", subset, {"task": "lift"})
    env = make_env("reach")
    with pytest.raises(SpecError, match="state.object.cube"):
        check_compatible(subset, env.robot_spec, hardware=False)
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "eval", f"ckpt={tmp_path / 'ck'}", "task=reach",
                        "episodes=2", "video=false"], capture_output=True, text=True,
                       env={**os.environ, "MUJOCO_GL": "egl"}, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "state.object.cube" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_rendering_and_torch_training_share_a_process():
    """Mesa's software GL and triton both bring LLVM; triton imported after a GL context segfaulted."""
    code = ("import robot_rl, torch\nfrom robot_rl.sim import make_env\n"
            "e = make_env('reach', obs_mode='image'); e.reset(seed=0)\n"
            "m = torch.nn.Linear(3, 3); opt = torch.optim.AdamW(m.parameters()); m(torch.ones(1, 3)).sum().backward()\n"
            "opt.step(); print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MUJOCO_GL": "egl"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-400:]
