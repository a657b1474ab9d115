"""RL fine-tuning: chunk transitions from real stores, IQL critics (MSE and HL-Gauss), the OPE gate of
the offline update, the actor's critic-ranked selection, the DDPG+BC gradient through the one-step
student, resume of the online loop, and the `robot-rl finetune` command end to end."""

import json

import numpy as np
import pytest
import torch
from robot_rl.policies.checkpoint import load_policy
from robot_rl.policies.critic import ChunkCritic, CriticConfig, hl_gauss_target
from robot_rl.sim import make_env, make_expert

from robot_rl.learning.finetune import (
    ChunkData,
    ExploringAgent,
    FinetuneConfig,
    Learner,
    awr_weights,
    finetune_offline,
    finetune_online,
)
from robot_rl.learning.train import LoopConfig, make_teacher, train_diffusion
from robot_rl.rollout import EpisodeRecorder, RandomPolicy, run_episodes
from robot_rl.store import EpisodeStore
from robot_rl.store.tools import prepare

SMALL = {"down_dims": (32, 64, 128), "step_embed_dim": 64}
KEYS = ["state.ee_pose", "state.object.goal"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """reach: 12 scripted successes (seeds 0…) and 6 random-policy failures (truncated at 50 steps)."""
    root = tmp_path_factory.mktemp("ft")
    env = make_env("reach")
    for name, policy, n, seed, source in (("demos", make_expert(env), 12, 0, "scripted"),
                                          ("failures", RandomPolicy(env), 6, 50, "policy")):
        rec = EpisodeRecorder(root / f"{name}.zarr", env.robot_spec, "reach", source)
        run_episodes(env, policy, n, seed, "reach", name, progress=False, recorder=rec)
        rec.close()
        prepare(root / f"{name}.zarr")
    env.close()
    return [str(root / "demos.zarr"), str(root / "failures.zarr")]


@pytest.fixture(scope="module")
def weak_teacher(stores, tmp_path_factory):
    """A weak state teacher (about 25 % on reach) from a short run on the scripted episodes of the store."""
    out = tmp_path_factory.mktemp("ft") / "teacher"
    loop = LoopConfig(steps=1000, batch_size=64, lr=1e-3, warmup_steps=10, eval_episodes=0, ckpt_every=0, log_every=50)
    train_diffusion(stores[:1], out, dict(SMALL), loop, keys=KEYS, task="reach", progress=False)
    return out


def test_hl_gauss_target_is_a_distribution_centred_on_the_value():
    edges = torch.linspace(-1.5, 1.5, 52)
    centers = (edges[1:] + edges[:-1]) / 2
    y = torch.tensor([-0.7, 0.0, 0.42, 5.0])
    p = hl_gauss_target(y, edges, 0.75 * 3 / 51)
    assert torch.allclose(p.sum(-1), torch.ones(4))
    assert torch.allclose((p * centers).sum(-1)[:3], y[:3], atol=2e-3)
    assert (p * centers).sum(-1)[3] == pytest.approx(1.5, abs=0.05)  # clamped to the support
    with pytest.raises(ValueError, match="q_loss"):
        CriticConfig(obs_dim=3, act_dim=2, q_loss="huber")


def test_standardised_advantage_weights_do_not_depend_on_the_reward_scale():
    adv = torch.tensor([-0.02, -0.01, 0.0, 0.01, 0.03])  # the scale of IQL advantages under a sparse 0/1 reward
    raw = awr_weights(adv, beta=10.0, max_weight=100.0, normalize=False)
    assert float(raw.max() / raw.min()) < 1.7  # raw exp(10·A): next to uniform, i.e. plain behaviour cloning
    w = awr_weights(adv, beta=1.0, max_weight=100.0, normalize=True)
    assert torch.allclose(w, awr_weights(50 * adv, beta=1.0, max_weight=100.0, normalize=True))
    assert float(w.mean()) == pytest.approx(1.0) and float(w.max() / w.min()) > 10 and w.argmax() == 4
    b = awr_weights(adv, beta=10.0, max_weight=100.0, mode="binary")  # CRR's filter: only what beats V, equally
    assert b.tolist() == pytest.approx([0.0, 0.0, 0.0, 2.5, 2.5])
    assert awr_weights(-adv.abs(), beta=10.0, max_weight=100.0, mode="binary").sum() == 0  # nothing to clone


def test_chunk_transitions_sum_rewards_and_stop_at_terminals(stores):
    demos, failures = EpisodeStore(stores[0]), EpisodeStore(stores[1])
    policy = make_teacher([demos], KEYS, dict(SMALL))
    data = ChunkData(stores[:1], policy, gamma=0.9, online=stores[1:])
    n_act = policy.cfg.n_action_steps
    for st, e, offset in ((demos, 0, 0), (failures, 1, demos.n_steps)):  # a success (terminated), a failure (truncated)
        reward, term = st.load("reward"), st.load("terminated")
        s, t_end = int(st.starts[e]), int(st.ends[e])
        for t in range(s, t_end):
            k = min(n_act, t_end - t)
            expect = sum(0.9**i * reward[t + i] for i in range(k))
            assert float(data.ret[offset + t]) == pytest.approx(expect, abs=1e-6)
            to_go = sum(0.9**i * reward[t + i] for i in range(t_end - t))  # Monte Carlo, to the episode's end
            assert float(data.mc_return[offset + t]) == pytest.approx(to_go, abs=1e-6)
            nxt = int(data.next_ids[offset + t]) - offset
            assert s <= nxt < t_end and nxt == min(t + n_act, t_end - 1)
            if t + n_act >= t_end and term[t_end - 1]:
                assert float(data.discount[offset + t]) == 0.0  # the episode ended inside this chunk: no bootstrap
            else:
                assert float(data.discount[offset + t]) == pytest.approx(0.9**k)
        assert bool(term[t_end - 1]) == bool(st.meta[e]["success"]) == (st is demos)
    n = demos.n_steps + failures.n_steps
    assert data.obs.shape == (n, policy.cfg.n_obs_steps * 14)
    assert data.act.shape == (n, n_act * 7) and float(data.act[: demos.n_steps].abs().max()) <= 1.0 + 1e-5
    assert list(data.offline_ids) == list(range(demos.n_steps)) and len(data.online_ids) == failures.n_steps
    assert len(data.start_ids) == 18
    ids = data.sample(np.random.default_rng(0), 100, 0.5)  # RLPD: half offline, half online
    assert (ids < demos.n_steps).sum() == 50


@pytest.mark.parametrize("q_loss", ["mse", "hlgauss"])
def test_iql_critic_values_successful_starts_above_failures(stores, q_loss, tmp_path):
    torch.manual_seed(0)
    policy = make_teacher([EpisodeStore(stores[0])], KEYS, dict(SMALL))
    data = ChunkData(stores, policy, gamma=0.95)
    cfg = FinetuneConfig(critic={"q_loss": q_loss, "hidden": 128}, batch_size=128, critic_lr=1e-3)
    learner = Learner(policy, Learner.new_critic(policy, data, cfg), cfg)
    rng = np.random.default_rng(0)
    for _ in range(400):
        learner.critic_step(data, rng.integers(0, data.n, 128))
    with torch.no_grad():
        v = learner.critic.value(data.obs[data.start_ids]).numpy()
        q_data = learner.critic.q(data.obs, data.act).numpy()
    ok = np.r_[np.ones(12, bool), np.zeros(6, bool)]  # episodes in store order: 12 successes, then 6 failures
    assert v[ok].mean() > v[~ok].mean() + 0.3, (v[ok], v[~ok])
    last = np.r_[data.start_ids[1:], data.n] - 1
    assert q_data[last[ok]].mean() > 0.7 and abs(q_data[last[~ok]].mean()) < 0.3  # r = 1 at success, 0 else
    learner.critic.save(tmp_path / "critic")
    again = ChunkCritic.load(tmp_path / "critic")
    assert torch.allclose(again.value(data.obs[:8]), learner.critic.value(data.obs[:8]))


def test_offline_update_is_kept_only_when_the_estimate_improves(stores, weak_teacher, tmp_path):
    base = dict(critic_steps=200, policy_steps=40, gate_every=20, batch_size=64, ope_windows=18, redistill_steps=20,
                eval_episodes=0)
    rejected = finetune_offline(weak_teacher, stores, tmp_path / "no", FinetuneConfig(gate_threshold=1e9, **base),
                                progress=False)
    assert not rejected["kept"] and not (tmp_path / "no" / "policy").exists()
    assert len(rejected["ope_trace"]) == 3 and (tmp_path / "no" / "critic" / "critic.safetensors").exists()
    kept = finetune_offline(weak_teacher, stores, tmp_path / "yes",
                            FinetuneConfig(gate_threshold=-1e9, **base), progress=False)
    assert kept["kept"] and kept["ope_best"] == max(v for _, v in kept["ope_trace"][1:])  # the best candidate
    improved, student = load_policy(tmp_path / "yes" / "policy"), load_policy(tmp_path / "yes" / "student")
    assert improved.kind == "diffusion" and student.kind == "consistency"  # the kept teacher was re-distilled
    assert improved.checkpoint_config["finetuned_from"] == str(weak_teacher)
    start = load_policy(weak_teacher)
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), improved.state_dict().values()))


def test_online_rounds_record_every_episode_and_resume_after_a_stop(stores, weak_teacher, tmp_path):
    cfg = dict(critic_steps=50, episodes_per_round=2, eval_episodes=0, batch_size=64, utd=0.1, sampler="ddim5")
    make = lambda: make_env("reach")  # noqa: E731
    first = finetune_online(weak_teacher, "reach", make, stores, tmp_path, FinetuneConfig(rounds=1, **cfg),
                            progress=False)
    assert first["history"]["rounds"] == [0]
    assert EpisodeStore(tmp_path / "online.zarr").n_episodes == 2
    second = finetune_online(weak_teacher, "reach", make, stores, tmp_path, FinetuneConfig(rounds=3, **cfg),
                             progress=False)
    assert second["history"]["rounds"] == [0, 1, 2]  # resumed at round 1, not restarted
    online = EpisodeStore(tmp_path / "online.zarr")
    assert online.n_episodes == 6 and {m["source"] for m in online.meta} == {"policy"}
    assert second["env_steps"] == online.n_steps
    assert (tmp_path / "curves.png").stat().st_size > 0 and any((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "report.json").read_text())["mode"] == "online"


def test_actor_runs_the_chunk_the_critic_values_most(stores, weak_teacher):
    """select_n: candidates come from the policy; the critic only ranks them. A critic that values
    +x motion picks the candidate with the most +x motion in its executed steps — through `act`, the
    call the actor's rollouts make."""
    policy = load_policy(weak_teacher)
    cfg = policy.cfg
    critic = ChunkCritic(CriticConfig(obs_dim=cfg.n_obs_steps * 14, act_dim=cfg.n_action_steps * 7))
    x_of = torch.zeros(cfg.n_action_steps * 7)
    x_of[0::7] = 1.0  # normalised x of each executed step
    critic.q = lambda obs, act, target=False: act @ x_of  # noqa: E731  (the ranking under test, not a learned one)
    env = make_env("reach")
    obs, _ = env.reset(seed=100_000)
    picks, plain = [], []
    for n, out in ((16, picks), (1, plain)):
        agent = ExploringAgent(policy, "ddim5", "cpu", std=0.0, critic=critic, select_n=n)
        for seed in range(6):
            agent.reset(np.random.default_rng(seed))
            first_action = agent.act(obs)
            out.append(first_action[0] + sum(a[0] for a in agent.queue))
    env.close()
    assert np.mean(picks) > np.mean(plain), (picks, plain)


def test_ddpg_bc_moves_the_one_step_student_towards_higher_q(stores, weak_teacher, tmp_path):
    from robot_rl.learning.train import distill

    loop = LoopConfig(steps=20, batch_size=64, lr=3e-4, warmup_steps=5, eval_episodes=0, ckpt_every=0, log_every=10)
    student, _ = distill(weak_teacher, tmp_path / "student", loop, skip=20, progress=False)
    data = ChunkData(stores, student, gamma=0.95)
    cfg = FinetuneConfig(extraction="ddpg_bc", q_weight=10.0, policy_lr=1e-3, batch_size=64)
    learner = Learner(student, Learner.new_critic(student, data, cfg), cfg)
    rng = np.random.default_rng(0)
    for _ in range(200):
        learner.critic_step(data, rng.integers(0, data.n, 64))
    ids = data.start_ids
    torch.manual_seed(1)
    with torch.no_grad():
        q0 = float(learner.critic.q(data.obs[ids], learner.one_step_actions(data.batch(ids))).mean())
    for _ in range(30):
        learner.policy_step(data, rng.integers(0, data.n, 64))
    torch.manual_seed(1)
    with torch.no_grad():
        q1 = float(learner.critic.q(data.obs[ids], learner.one_step_actions(data.batch(ids))).mean())
    assert q1 > q0 + 0.02, (q0, q1)
    with pytest.raises(ValueError, match="one-step"):
        Learner(load_policy(weak_teacher), learner.critic, cfg)


def test_finetune_command(stores, weak_teacher, tmp_path):
    common = [f"ckpt={weak_teacher}", f"store={stores[0]}", "progress=false", "sampler=ddim5",
              "finetune.critic_steps=50", "finetune.batch_size=32", "finetune.eval_episodes=4"]
    out = run_cli("finetune", *common, "mode=offline", "finetune.policy_steps=10", "finetune.redistill_steps=5",
                  f"finetune.out={tmp_path / 'off'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "offline update" in out.stdout and "before" in out.stdout
    out = run_cli("finetune", *common, "finetune.rounds=1", "finetune.episodes_per_round=2", "finetune.utd=0.1",
                  "finetune.advantage=mc", "finetune.weighting=binary", f"finetune.out={tmp_path / 'on'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "on" / "curves.png").exists() and (tmp_path / "on" / "policy" / "config.json").exists()
    from importlib import resources

    scored = tmp_path / "scored_cell.yaml"  # a robot cell that scores reach_point episodes, not reach ones
    shipped = resources.files("robot_rl.hardware_configs") / "franka_panda.yaml"
    scored.write_text(shipped.read_text() + "reward: {kind: reach}\n")
    assert json.loads((tmp_path / "on" / "report.json").read_text())["config"]["weighting"] == "binary"
    for args, needle in ((["mode=sideways"], "online or offline"), (["finetune.extraction=ddpg_bc"], "one-step"),
                         (["finetune.weighting=ranked"], "not exp or binary"),
                         (["finetune.actor=ros", "hardware_config=franka_panda"], "needs the cell's own reward"),
                         (["finetune.actor=ros", f"hardware_config={scored}"], "does not score task 'reach'")):
        bad = run_cli("finetune", *common, *args, f"finetune.out={tmp_path / 'bad'}")
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, bad.stderr
    clf = run_cli("train", "policy=reward_classifier", f"store=[{stores[0]},{stores[1]}]", "train.steps=20",
                  f"train.obs_keys=[{','.join(KEYS)}]", f"train.out={tmp_path / 'clf'}", "progress=false")
    assert clf.returncode == 0 and "held-out accuracy" in clf.stdout, clf.stderr[-2000:]
    only_successes = run_cli("train", "policy=reward_classifier", f"store={stores[0]}", f"train.out={tmp_path / 'x'}")
    assert only_successes.returncode != 0 and "failed episodes" in only_successes.stderr


def run_cli(*args, env=None, nice: int = 0):
    """`robot-rl <args>` in a subprocess; `nice` lowers its CPU share (and its children's)."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "robot_rl.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env, preexec_fn=(lambda: os.nice(nice)) if nice else None)


def test_step_labels_leave_the_frames_before_success_out():
    from robot_rl.policies.reward import step_labels

    lab = step_labels(np.array([8, 5]), np.array([True, False]), positive_steps=2, margin_steps=3)
    assert lab.tolist() == [0, 0, 0, -1, -1, -1, 1, 1] + [0] * 5


def test_reward_classifier_learns_success_from_episode_labels(stores, tmp_path):
    """HIL-SERL's reward: a success detector trained only from the episodes' success labels, then
    turned into per-step rewards that agree with the task's own success reward."""
    from robot_rl.policies.reward import RewardClassifier

    from robot_rl.learning.reward import classifier_rewards, train_reward_classifier

    env = make_env("reach")  # more labelled successes than the shared store holds
    rec = EpisodeRecorder(tmp_path / "demos.zarr", env.robot_spec, "reach")
    run_episodes(env, make_expert(env), 40, 1000, "reach", "scripted", progress=False, recorder=rec)
    rec.close()
    env.close()
    prepare(tmp_path / "demos.zarr")
    stores = [str(tmp_path / "demos.zarr"), stores[1]]
    _, report = train_reward_classifier(stores, tmp_path / "clf", KEYS, steps=800, batch_size=64, lr=1e-3, progress=False,
                                        positive_steps=2, margin_steps=1)
    assert report["train"]["accuracy"] > 0.9 and report["train"]["recall"] > 0.8, report
    clf = RewardClassifier.load(tmp_path / "clf")
    r = classifier_rewards(clf, stores)
    demos = EpisodeStore(stores[0])
    task = np.r_[demos.load("reward"), EpisodeStore(stores[1]).load("reward")]
    assert r[demos.n_steps:].mean() < 0.1  # the random failures rarely look like success
    hits = [r[max(int(demos.starts[e]), int(demos.ends[e]) - 2):int(demos.ends[e])].max() for e in range(demos.n_episodes)]
    assert np.mean(hits) >= 0.7, hits  # the steps that reached the goal are rewarded (12 demos, some held out)
    early = np.concatenate([np.arange(int(demos.starts[e]), int(demos.ends[e]) - 5) for e in range(demos.n_episodes)])
    assert r[early].mean() < 0.1 and task[early].sum() == 0  # far from the goal: no reward
    data = ChunkData(stores, clf_policy := make_teacher([demos], KEYS, dict(SMALL)), 0.9, "classifier", classifier=clf)
    assert data.ret.shape[0] == demos.n_steps + EpisodeStore(stores[1]).n_steps and clf_policy.kind == "diffusion"
    with pytest.raises(ValueError, match="reward classifier"):
        RewardClassifier.load(tmp_path)


def test_a_scripted_operator_intervenes_and_its_steps_are_flagged_and_learned_from(stores, weak_teacher, tmp_path):
    """operator=scripted: the operator takes over when the weak policy strays from the expert's path;
    those steps are recorded as interventions, count as demonstration data, and give RLIF rewards."""
    cfg = FinetuneConfig(rounds=1, episodes_per_round=4, critic_steps=20, batch_size=32, utd=0.1, eval_episodes=0,
                         sampler="ddim5", operator="scripted", reward="rlif")
    rep = finetune_online(weak_teacher, "reach", lambda: make_env("reach"), stores[:1], tmp_path, cfg, progress=False)
    online = EpisodeStore(tmp_path / "online.zarr")
    flags = online.load("intervention")
    takeovers = rep["history"]["interventions"][0] * 4
    assert takeovers >= 1 and flags.any() and not flags.all(), (takeovers, flags.mean())
    assert online.meta[0]["source"] == "policy"
    policy = load_policy(weak_teacher)
    data = ChunkData(stores[:1], policy, 0.9, "rlif", online=[tmp_path / "online.zarr"])
    n_demo = EpisodeStore(stores[0]).n_steps
    human = n_demo + np.flatnonzero(flags)
    assert set(human) <= set(data.offline_ids) and not set(human) & set(data.online_ids)  # HIL-SERL routing
    assert float(data.ret[n_demo:].min()) < 0  # RLIF: −1 before a takeover


def test_online_finetuning_through_the_ros_graph_hot_reloads_the_learners_weights(stores, weak_teacher, tmp_path):
    """`finetune.actor=ros`: the policy acts through `launch/sim_hil` (policy server exploring,
    executor, mux, safety filter, recorder writing the online store in its own process); the learner
    reads only that store, and each round's weights reach the server by a verified hot reload."""
    from tests.helpers.ros import ROOT, free_port, fresh_domain, ros_env

    out = tmp_path / "ros"
    r = run_cli("finetune", f"ckpt={weak_teacher}", f"store={stores[0]}", "progress=false", "sampler=ddim5",
                "finetune.actor=ros", "finetune.rounds=3", "finetune.episodes_per_round=1", "finetune.utd=0.1",
                "finetune.critic_steps=20", "finetune.batch_size=32", "finetune.eval_episodes=0",
                f"finetune.out={out}", f"hardware_config={ROOT / 'tests' / 'hardware' / 'sim_small.yaml'}",
                f"console.port={free_port()}", env=ros_env(fresh_domain()))
    log = (out / "actor_launch.log").read_text() if (out / "actor_launch.log").exists() else ""
    assert r.returncode == 0, (r.stderr[-2000:], log[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert report["actor"]["kind"] == "ros" and report["actor"]["hot_reloads"] == 2, report["actor"]
    assert "now serving v1" in log and "now serving v2" in log  # the server swapped each announced version in
    online = EpisodeStore(out / "online.zarr")  # written by the recorder node, read by the learner
    assert online.n_episodes == 3 and {m["source"] for m in online.meta} == {"hil"}
    assert [m["policy_versions"] for m in online.meta] == [[0], [1], [2]]  # round k acted with the k-th weights
    assert report["env_steps"] == online.n_steps and report["history"]["rounds"] == [0, 1, 2]
    for v in (1, 2):
        assert load_policy(out / "weights" / f"v{v}").cfg == load_policy(weak_teacher).cfg


def test_rlpd_sac_baseline_reads_the_stores_and_trains(stores):
    """The side-by-side baseline of benchmarks/finetune.py: transitions from the stores (a truncated
    episode's last step has no next observation and is left out; a success's last step is terminal),
    then online SAC with half of every batch from them."""
    from robot_rl.learning.sac import SACConfig, store_transitions, train_rlpd

    demos, failures = EpisodeStore(stores[0]), EpisodeStore(stores[1])
    data = store_transitions(stores, KEYS, 7)
    assert len(data) == demos.n_steps + failures.n_steps - failures.n_episodes
    assert data.arrays["done"][:len(data)].sum() == demos.n_episodes  # every demonstration ends in success
    make = lambda: make_env("reach")  # noqa: E731
    cfg = SACConfig(hidden=32, batch_size=32, max_env_steps=120, eval_every=60, eval_episodes=2)
    rep = train_rlpd("reach", make, stores, KEYS, cfg)
    assert [s for s, _ in rep["curve"]] == [0, 60, 120] and rep["env_steps"] == 120
    assert all(np.isfinite(v) for v in rep["last"].values()) and rep["last"]["alpha"] < cfg.init_temperature
