"""`robot-rl`: the one command-line entry point. Grammar (ARCHITECTURE.md):

    robot-rl <verb> [<sub>] [<store|file>] [key=value ...]

Overrides are Hydra overrides on the config tree shipped in robot_rl/configs. Every user error is
one line on stderr (what, where, what to do) and exit status 2; never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

VERBS: dict[str, dict[str, str]] = {
    "sim": {"list": "list the tasks", "rollout": "roll out a policy on a task: task=lift policy=scripted episodes=50"},
    "demo": {"": "the end-to-end demonstration (scripted experts on every task, report with videos)"},
    "data": {"info": "episodes, steps, sources, success rate, size: data info <store>",
             "validate": "schema, dtypes, stamps, chunks; exit 1 naming the first problem: data validate <store>",
             "merge": "store=[a,b] record=<out>", "split": "<store> data.fraction=0.9 record=[a,b]",
             "filter": "<store> data.source=teleop data.success=true record=<out>",
             "prepare": "policy-resolution images and normalisation statistics: data prepare <store>",
             "preview": "<store> episode=K [out=preview.mp4]: video with action and intervention overlays",
             "export": "<store> record=<dir>: LeRobotDataset v3", "import": "<path> record=<store> data.format=lerobot|rosbag"},
    "train": {"": "train a diffusion teacher: policy=diffusion task=<task> store=<store> [train.steps=...], "
                  "or a success detector for rewards: policy=reward_classifier store=[<stores>]"},
    "distill": {"": "distil a one-step consistency student: teacher=<ckpt> [distill.steps=...]"},
    "eval": {"": "closed-loop evaluation: ckpt=<ckpt> task=<task> episodes=N sampler=<ddpm100|ddim10|cm1|cm3>"},
    "finetune": {"": "RL fine-tuning: ckpt=<ckpt> [mode=online|offline] [store=<demos>] [finetune.rounds=...]"},
    "launch": {"": "run a ROS 2 launch file: launch <file|sim_bringup|robot_bringup> [name:=value ...]"},
    "run": {"": "a policy on the sim robot through ROS 2: ckpt=<ckpt> [mode=lockstep|realtime] episodes=N"},
    "record": {"": "demonstrations through ROS 2: task=<task> teleop=<keyboard|spacemouse|spacenav|joy> episodes=N "
                   "[record=<store>] [operator=scripted]"},
    "replay": {"": "a recorded episode's actions on the sim robot: replay <store> episode=K"},
}


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def usage() -> str:
    lines = ["usage: robot-rl <verb> [<sub>] [<store|file>] [key=value ...]", ""]
    for verb, subs in VERBS.items():
        for sub, text in subs.items():
            lines.append(f"  robot-rl {verb}{' ' + sub if sub else '':<10} {text}")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[str, str, str | None, list[str]]:
    if not argv or argv[0] in ("-h", "--help", "help"):
        raise SystemExit(usage())
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise UserError(f"unknown verb '{verb}'; verbs: {sorted(VERBS)} (robot-rl --help)")
    sub = ""
    if "" not in VERBS[verb]:
        if not rest or rest[0] not in VERBS[verb]:
            got = rest[0] if rest else "nothing"
            raise UserError(f"'robot-rl {verb}' needs one of {sorted(VERBS[verb])}, got {got}")
        sub, rest = rest[0], rest[1:]
    positional = [a for a in rest if "=" not in a]
    overrides = [a for a in rest if "=" in a]
    if len(positional) > 1:
        raise UserError(f"'robot-rl {verb} {sub}' takes at most one store or file, got {positional}")
    return verb, sub, (positional[0] if positional else None), overrides


def _map_task(overrides: list[str]) -> list[str]:
    """`task=<external id>` selects the `external` task config and sets its name."""
    from robot_rl.sim.registry import TASKS

    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "task" and value not in TASKS and value != "external":
            if "/" not in value:
                raise UserError(f"unknown task '{value}'; tasks: {sorted(TASKS)}, metaworld/<task>-v3 or a gymnasium id")
            out += ["task=external", f"task.name={value}"]
        else:
            out.append(o)
    return out


def _check_types(cfg: DictConfig, ref: DictConfig, where: str = "") -> None:
    """Overrides keep the type of the default (int stays int, bool stays bool)."""
    for k, default in ref.items():
        path = f"{where}{k}"
        if k not in cfg:
            continue
        v = cfg[k]
        if isinstance(default, DictConfig) and isinstance(v, DictConfig):
            _check_types(v, default, path + ".")
        elif default is not None and v is not None and not isinstance(default, (DictConfig, type(OmegaConf.create([])))):
            ok = isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise UserError(f"config key '{path}': expected {type(default).__name__}, got {v!r}")


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = _map_task(overrides)
    try:
        with initialize_config_module(config_module="robot_rl.configs", version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
            task_only = [o for o in overrides if o.startswith("task=") or o.startswith("task.name=")]
            ref = hydra_compose(config_name="config", overrides=task_only)
    except (HydraException, OmegaConfBaseException) as e:
        text = str(e).strip().splitlines()
        first = text[0] if text else type(e).__name__
        if "not in struct" in str(e) or "Could not override" in first:
            key = first.split("'")[1] if "'" in first else "?"
            raise UserError(f"unknown config key '{key}'; see robot_rl/configs (keys: {_keys_hint(key)})") from None
        if "Could not find" in first or "not found" in first.lower():
            raise UserError(f"{first} (robot-rl sim list shows the tasks)") from None
        raise UserError(f"bad override: {first}") from None
    _check_types(cfg, ref)
    return cfg


def _keys_hint(key: str) -> str:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="robot_rl.configs", version_base=None):
        cfg = hydra_compose(config_name="config")
    parent = cfg
    for part in key.split(".")[:-1]:
        parent = parent.get(part, cfg) if isinstance(parent, DictConfig) else cfg
    return ", ".join(sorted(parent.keys())) if isinstance(parent, DictConfig) else ", ".join(sorted(cfg.keys()))


def console():
    """A rich console that keeps tables readable when stdout is not a terminal (CI logs, pipes)."""
    import shutil

    from rich.console import Console

    return Console(width=max(120, shutil.get_terminal_size((120, 24)).columns))


def task_setup(cfg: DictConfig) -> tuple[str, dict]:
    t = OmegaConf.to_container(cfg.task, resolve=True)
    name = t.pop("name")
    return name, t


# ---- verbs ------------------------------------------------------------------------------------
def cmd_sim_list(cfg: DictConfig, positional: str | None) -> int:
    from rich.table import Table

    from robot_rl.sim.registry import EXTERNAL_EXAMPLES, TASKS

    t = Table(title="robot-rl tasks")
    for col in ("task", "gymnasium id", "expert", "description"):
        t.add_column(col)
    for e in TASKS.values():
        t.add_row(e.name, e.env_id, "scripted", e.description)
    for name, text in EXTERNAL_EXAMPLES.items():
        t.add_row(name, name if "/" in name and not name.startswith("metaworld") else "Meta-World/MT1",
                  "metaworld" if name.startswith("metaworld") else "-", text)
    console().print(t)
    return 0


def _rollout(cfg: DictConfig, task_name: str, setup: dict, episodes: int, out: Path, record: str | None = None):
    from robot_rl.rollout import EpisodeRecorder, make_policy, run_episodes
    from robot_rl.sim import make_env
    from robot_rl.store import StoreError

    if episodes < 1:
        raise UserError(f"episodes={episodes}: need at least 1")
    try:
        env = make_env(task_name, **setup)
    except (TypeError, ValueError) as e:
        raise UserError(f"task '{task_name}': {e}") from None
    try:
        policy = make_policy(cfg.policy, env, cfg.seed)
    except ValueError as e:
        env.close()
        raise UserError(str(e)) from None
    video = out / f"{task_name.replace('/', '_')}.gif" if cfg.video else None
    recorder = None
    try:
        if record:
            source = "scripted" if cfg.policy in ("scripted", "random") else "policy"
            recorder = EpisodeRecorder(record, env.robot_spec, task_name, source, cfg.data.image_codec or "blosc_zstd")
        return run_episodes(env, policy, episodes, cfg.seed, task_name, cfg.policy, video, progress=cfg.progress,
                            recorder=recorder)
    except StoreError as e:
        raise UserError(str(e)) from None
    finally:
        if recorder is not None:
            recorder.close()
        env.close()


def cmd_sim_rollout(cfg: DictConfig, positional: str | None) -> int:
    from robot_rl.rollout import summary_table

    name, setup = task_setup(cfg)
    out = Path(cfg.out)
    s = _rollout(cfg, name, setup, cfg.episodes, out, cfg.record)
    console().print(summary_table([s]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(s.to_dict(), indent=2))
    return 0


def cmd_demo(cfg: DictConfig, positional: str | None) -> int:
    from robot_rl.rollout import summary_table

    out = Path(cfg.demo.out)
    summaries = []
    for task in cfg.demo.tasks:
        tcfg = compose([f"task={task}", f"seed={cfg.seed}"])
        name, setup = task_setup(tcfg)
        summaries.append(_rollout(cfg, name, setup, int(cfg.demo.episodes), out))
    console().print(summary_table(summaries))
    learned = _demo_learning(cfg, out) if cfg.demo.learn.task else None
    write_report(out, summaries, learned)
    console().print(f"report: {out / 'report.md'}")
    return 0


def _demo_learning(cfg: DictConfig, out: Path) -> dict:
    """Scripted demos -> store -> diffusion teacher -> one-step student -> paired evaluation."""
    import shutil

    from rich.table import Table

    from robot_rl.learning.pipeline import PipelineConfig, run_pipeline
    from robot_rl.learning.train import LoopConfig

    learn = cfg.demo.learn
    name, setup = task_setup(compose([f"task={learn.task}"]))
    work = out / "learn"
    shutil.rmtree(work, ignore_errors=True)  # the demo always starts from scratch
    result = run_pipeline(PipelineConfig(
        task=name, setup=setup, demos=int(learn.demos), net=OmegaConf.to_container(cfg.net, resolve=True),
        train=LoopConfig(steps=int(learn.train_steps), lr=3e-4, warmup_steps=200, eval_episodes=0, ckpt_every=0,
                         seed=int(cfg.seed), device=cfg.device),
        distill=LoopConfig(steps=int(learn.distill_steps), lr=3e-4, warmup_steps=50, eval_episodes=0, ckpt_every=0,
                           seed=int(cfg.seed), device=cfg.device),
        eval_episodes=int(learn.eval_episodes), eval_seed=int(cfg.train.eval_seed), progress=cfg.progress), work)
    t = Table(title=f"learned policies on {name} (paired seeds from {cfg.train.eval_seed})")
    for c in ("policy", "sampler", "success", "95% CI", "p50 ms/chunk", "p99 ms/chunk"):
        t.add_column(c)
    for r in result["rows"]:
        t.add_row(r["policy"], r["sampler"], f"{100 * r['success_rate']:.1f}%", f"[{100 * r['ci95'][0]:.1f}, "
                  f"{100 * r['ci95'][1]:.1f}]", f"{r['latency_p50_ms']:.2f}", f"{r['latency_p99_ms']:.2f}")
    console().print(t)
    return result


def write_report(out: Path, summaries, learned: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"experts": [s.to_dict() for s in summaries], "learned": learned},
                                                 indent=2))
    lines = ["# robot-rl demo report", "", "## Scripted experts", "",
             "Seeded episodes (episode i uses seed + i).", "",
             "| task | episodes | success | 95% CI | mean length | steps/s | solutions | video |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lo, hi = s.ci95
        sol = ", ".join(f"{k} {v}" for k, v in sorted(s.solutions.items())) or "-"
        vid = f"![{s.task}]({Path(s.video).name})" if s.video else "-"
        lines.append(f"| {s.task} | {s.episodes} | {100 * s.success_rate:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{sum(s.lengths) / max(1, len(s.lengths)):.1f} | {s.steps_per_s:.0f} | {sol} | {vid} |")
    if learned:
        rows = {(r["policy"], r["sampler"]): r for r in learned["rows"]}
        ddim = rows[("teacher", "ddim10")]["latency_p50_ms"]
        lines += ["", f"## Learned policies on `{learned['task']}`", "",
                  "Scripted demonstrations -> episode store -> diffusion teacher -> one-step consistency student; "
                  "evaluated on the same seeds (disjoint from the demonstration seeds).", "",
                  "| policy | sampler | episodes | success | 95% CI | p50 ms/chunk | p99 ms/chunk | speed-up vs DDIM-10 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in learned["rows"]:
            lines.append(f"| {r['policy']} | {r['sampler']} | {r['episodes']} | {100 * r['success_rate']:.1f}% | "
                         f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] | {r['latency_p50_ms']:.2f} | "
                         f"{r['latency_p99_ms']:.2f} | {ddim / max(1e-9, r['latency_p50_ms']):.1f}x |")
        if learned.get("cm1_vs_ddim10") is not None:
            lines += ["", f"Noise for noise, the student's one-step chunk lies {learned['cm1_vs_ddim10']:.3f} (normalised "
                      "units, executed steps, used action dimensions) from the teacher's DDIM-10 chunk drawn from the "
                      "same noise, on demonstration windows."]
        lines += ["", "Training curves: ![teacher](learn/teacher/curves.png) ![student](learn/student/curves.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def cmd_data(sub: str):
    def run(cfg: DictConfig, positional: str | None) -> int:
        from robot_rl import data_cli
        from robot_rl.spec import SpecError
        from robot_rl.store import StoreError

        try:
            return data_cli.run(sub, cfg, positional, console())
        except (StoreError, SpecError) as e:
            raise UserError(str(e)) from None
    return run


def cmd_learn(verb: str):
    def run(cfg: DictConfig, positional: str | None) -> int:
        from robot_rl import learn_cli
        from robot_rl.policies.checkpoint import CheckpointError
        from robot_rl.spec import SpecError
        from robot_rl.store import StoreError

        try:
            return learn_cli.COMMANDS[verb](cfg, positional, console(), task_setup)
        except (StoreError, SpecError, CheckpointError) as e:
            raise UserError(str(e)) from None
    return run


def cmd_graph(verb: str):
    """The verbs that drive the ROS 2 graph (run, record) or replay what it recorded."""
    def run(cfg: DictConfig, positional: str | None) -> int:
        from robot_rl.hardware import HardwareConfigError
        from robot_rl.policies.checkpoint import CheckpointError
        from robot_rl.store import StoreError

        if verb == "run":
            from robot_rl.run_cli import RunError
            from robot_rl.run_cli import run as fn
        else:
            from robot_rl.record_cli import RunError, record, replay

            fn = record if verb == "record" else (lambda c, con: replay(c, positional, con))
        try:
            return fn(cfg, console())
        except (RunError, HardwareConfigError, CheckpointError, StoreError) as e:
            raise UserError(str(e)) from None
    return run


COMMANDS: dict[tuple[str, str], Callable[[DictConfig, str | None], int]] = {
    ("sim", "list"): cmd_sim_list,
    ("sim", "rollout"): cmd_sim_rollout,
    ("demo", ""): cmd_demo,
    **{("data", sub): cmd_data(sub) for sub in VERBS["data"]},
    **{(verb, ""): cmd_learn(verb) for verb in ("train", "distill", "eval", "finetune")},
    **{(verb, ""): cmd_graph(verb) for verb in ("run", "record", "replay")},
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "launch":  # ROS launch arguments (name:=value), not Hydra overrides
            from robot_rl.launcher import LaunchError
            from robot_rl.launcher import main as launch_main

            try:
                return launch_main(argv[1:])
            except LaunchError as e:
                raise UserError(str(e)) from None
        verb, sub, positional, overrides = parse(argv)
        cfg = compose(overrides)
        return COMMANDS[(verb, sub)](cfg, positional)
    except UserError as e:
        print(f"robot-rl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robot-rl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: one line, the traceback on request
        if os.environ.get("ROBOT_RL_DEBUG"):
            raise
        print(f"robot-rl: internal error: {type(e).__name__}: {e} (set ROBOT_RL_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
