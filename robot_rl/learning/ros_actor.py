"""The ROS 2 actor of online fine-tuning (`robot-rl finetune actor=ros`): the policy acts through the
same graph as on a robot — `launch/sim_hil`: policy server (with `explore_std` Gaussian exploration),
action executor, intervention mux, safety filter, recorder, web console — and the learner (the
`finetune` process) only sees what the recorder writes into the online store, which it re-reads
after every round. Each round's weights are saved as a new checkpoint and announced on the latched
`policy/weights` (`{path, version, sha256}`); the policy server verifies the hash and swaps them in
between two inferences, and the next round starts once `policy/info` reports the new version. The
sim runs in real time, as a robot does (a person may take over, and the recorder needs every stream
live before the first episode). On a robot cell the same loop runs on `launch/robot_hil`: each
episode starts from the arm's home pose and is scored by the cell's own reward (hardware config
`reward`, the sim task's point) — proven against `franka-sim` on the real FCI protocol.

A person can take over at any time from the web console (or the scripted operator does, with
`operator=scripted`); their steps are flagged and routed to the demonstration share of the batches.
The critic-ranked chunk selection (`select_n`) is in-process only: the server samples one chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from robot_rl.learning.finetune import FinetuneConfig, RoundResult, _save
from robot_rl.policies.checkpoint import read_config
from robot_rl.run_cli import EpisodeRunner, Graph, HilSession, RunError


class RosActor:
    def __init__(self, cfg: DictConfig, task: str, policy_path: Path, store: Path, cfg_ft: FinetuneConfig,
                 sampler: str, first_round: int, out: Path, console):
        from std_msgs.msg import String

        from robot_rl.hardware import load_hardware_config
        from robot_rl.nodes.common import qos
        from robot_rl.sim.registry import TASKS, _load

        hw = load_hardware_config(cfg.hardware_config)  # a sim cell, or a robot cell with its own reward (checked)
        # nobody at the keyboard: the web console is the takeover device (and the scripted operator's joystick)
        run_cfg = OmegaConf.merge(cfg, {"record": str(store), "teleop": "web", "operator": cfg_ft.operator})
        self.hil = HilSession(run_cfg, out)
        self.out, self.cfg_ft, self.console = out, cfg_ft, console
        seed = cfg_ft.train_seed + first_round * cfg_ft.episodes_per_round
        common = [f"ckpt:={Path(policy_path).resolve()}", f"hardware_config:={hw.source}", f"task:={task}",
                  f"sampler:={sampler}", f"device:={cfg_ft.device}", f"explore_std:={cfg_ft.explore_std}",
                  *self.hil.launch_args()]
        args = ["sim_hil", *common, "mode:=realtime", f"seed:={seed}"] if hw.is_sim else ["robot_hil", *common]
        self.g = Graph(args, out / "actor_launch.log", "robot_rl_finetune")
        try:
            max_steps = cfg.task.get("max_steps") or _load(TASKS[task].entry_point).default_max_steps
            self.runner = EpisodeRunner(self.g, task, max_steps, 1.0 / hw.rates.policy_hz, seed, self.hil,
                                        home=None if hw.is_sim else hw.arm.home_qpos)
            self.info: dict = {}
            self.g.node.create_subscription(String, "policy/info", self._on_info, qos("latched"))
            self.weights = self.g.node.create_publisher(String, "policy/weights", qos("latched"))
            self.hil.attach(self.g, console)
            self.g.spin_until(lambda: "version" in self.info, 120, "the policy server's info")
        except BaseException:
            self.close()
            raise
        self.version, self.reloads, self.first_round = int(self.info["version"]), 0, first_round

    def _on_info(self, m) -> None:
        self.info = json.loads(m.data)  # the newest whole message: a refusal is not remembered past it

    def announce(self, policy, rnd: int) -> None:
        """Save the learner's policy as a new checkpoint and wait until the server serves it."""
        self.version += 1
        path = _save(policy, self.out / "weights" / f"v{self.version}", self.info.get("ckpt", ""),
                     {"stage": "finetune online", "round": rnd})
        sha = read_config(path)["weights_sha256"]
        from std_msgs.msg import String

        self.weights.publish(String(data=json.dumps({"path": str(path.resolve()), "version": self.version,
                                                     "sha256": sha})))
        self.g.spin_until(lambda: self.info.get("version") == self.version or "refused" in self.info, 120,
                          f"the policy server to serve weights v{self.version}")
        if "refused" in self.info:
            raise RunError(f"the policy server refused weights v{self.version}: {self.info['refused']['why']}")
        self.reloads += 1

    def round(self, policy, _critic, rnd: int) -> RoundResult:
        from robot_rl.store import EpisodeStore

        if rnd > self.first_round:  # the learner updated the policy after the last round
            self.announce(policy, rnd)
        before = EpisodeStore(self.hil.store).n_steps if self.hil.store.exists() else 0
        results = [self.runner.episode() for _ in range(self.cfg_ft.episodes_per_round)]
        n = len(results)
        human = self.hil.summary(n)
        return RoundResult(n, sum(r["success"] for r in results), EpisodeStore(self.hil.store).n_steps - before,
                           sum(human["takeovers_per_episode"]))

    def summary(self) -> dict:
        """This process's view: the weights versions announced and served (hot reloads since the launch)."""
        return {"kind": "ros", "served_version": self.version, "hot_reloads": self.reloads,
                "launch_log": str(self.g.log_path), "store": str(self.hil.store)}

    def close(self) -> None:
        self.g.close()
        self.hil.close()
