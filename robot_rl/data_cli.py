"""`robot-rl data <sub>`: the store tools as commands (one store as the positional argument,
`store=` for stores read, `record=` for stores written)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from robot_rl.store import EpisodeStore, StoreError


class DataUsageError(StoreError):
    pass


def _track(desc: str):
    from rich.progress import track

    return lambda it: track(it, description=desc, transient=True)


def _one(positional: str | None, cfg: DictConfig, verb: str) -> Path:
    path = positional or (cfg.store if isinstance(cfg.store, str) else None)
    if not path:
        raise DataUsageError(f"'robot-rl data {verb}' needs a store: robot-rl data {verb} <store>")
    return Path(path)


def _many(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, ListConfig)):
        return [str(v) for v in value]
    return [str(value)]


def cmd_info(cfg: DictConfig, positional: str | None, console) -> int:
    from rich.table import Table

    s = EpisodeStore(_one(positional, cfg, "info")).summary()
    t = Table(title=f"store {s['path']}", show_header=False)
    rate = "-" if s["success_rate"] is None else f"{100 * s['success_rate']:.1f}%"
    for k, v in [("spec", s["spec"]), ("episodes", s["episodes"]), ("steps", s["steps"]),
                 ("sources", ", ".join(f"{k} {v}" for k, v in s["sources"].items()) or "-"), ("success rate", rate),
                 ("intervention steps", s["interventions"]), ("tasks", ", ".join(s["tasks"]) or "-"),
                 ("image codec", s["image_codec"]), ("keys", ", ".join(s["keys"])),
                 ("size", f"{s['size_bytes'] / 2**20:.1f} MiB")]:
        t.add_row(k, str(v))
    console.print(t)
    return 0


def cmd_validate(cfg: DictConfig, positional: str | None, console) -> int:
    from robot_rl.store.tools import validate

    path = _one(positional, cfg, "validate")
    try:
        s = validate(path, progress=_track("checking chunks"))
    except StoreError as e:
        print(f"robot-rl: invalid: {e}")
        return 1
    console.print(f"[green]valid[/]: {s['episodes']} episodes, {s['steps']} steps ({path})")
    return 0


def _record(cfg: DictConfig, verb: str, n: int = 1) -> list[str]:
    outs = _many(cfg.record)
    if len(outs) != n:
        raise DataUsageError(f"'robot-rl data {verb}' writes {n} store(s): give record=" +
                             ("<out>" if n == 1 else "[<a>,<b>]"))
    return outs


def cmd_merge(cfg: DictConfig, positional: str | None, console) -> int:
    from robot_rl.store.tools import copy_episodes

    paths = ([positional] if positional else []) + _many(cfg.store)
    if len(paths) < 2:
        raise DataUsageError("'robot-rl data merge' needs two or more stores: store=[a.zarr,b.zarr] record=<out>")
    out = _record(cfg, "merge")[0]
    stores = [EpisodeStore(p) for p in paths]
    n = copy_episodes([(s, range(s.n_episodes)) for s in stores], out, cfg.data.image_codec, _track("merging"))
    console.print(f"merged {n} episodes from {len(stores)} stores into {out}")
    return 0


def cmd_split(cfg: DictConfig, positional: str | None, console) -> int:
    from robot_rl.store.tools import copy_episodes, split_ids

    st = EpisodeStore(_one(positional, cfg, "split"))
    a, b = _record(cfg, "split", 2)
    first, second = split_ids(st.n_episodes, float(cfg.data.fraction), int(cfg.seed))
    for out, ids in ((a, first), (b, second)):
        copy_episodes([(st, ids)], out, cfg.data.image_codec, _track(f"writing {out}"))
    console.print(f"split {st.n_episodes} episodes: {len(first)} -> {a}, {len(second)} -> {b}")
    return 0


def cmd_filter(cfg: DictConfig, positional: str | None, console) -> int:
    from robot_rl.store.tools import copy_episodes

    st = EpisodeStore(_one(positional, cfg, "filter"))
    d = cfg.data
    ids = st.select(source=d.source, success=d.success, task=d.task)
    if not ids:
        raise DataUsageError(f"store {st.path}: no episode matches source={d.source} success={d.success} task={d.task}")
    out = _record(cfg, "filter")[0]
    copy_episodes([(st, ids)], out, d.image_codec, _track("filtering"))
    console.print(f"kept {len(ids)} of {st.n_episodes} episodes -> {out}")
    return 0


def cmd_prepare(cfg: DictConfig, positional: str | None, console) -> int:
    from robot_rl.store.tools import prepare

    path = _one(positional, cfg, "prepare")
    p = prepare(path, cfg.data.width, cfg.data.height, cfg.data.image_codec, _track("resizing"))
    console.print(f"prepared {path}: images {p['images'] or 'none'}, statistics for {len(p['stats'])} keys")
    return 0


def cmd_preview(cfg: DictConfig, positional: str | None, console) -> int:
    from robot_rl.store.tools import preview

    path = _one(positional, cfg, "preview")
    out = Path(cfg.out) / f"{path.stem}_episode{cfg.episode}.mp4" if cfg.out == "outputs/rollout" else Path(cfg.out)
    if out.suffix not in (".mp4", ".gif"):
        out = out / f"{path.stem}_episode{cfg.episode}.mp4"
    written = preview(path, int(cfg.episode), out, cfg.data.camera)
    console.print(f"preview: {written}")
    return 0


def cmd_export(cfg: DictConfig, positional: str | None, console) -> int:
    from robot_rl.store.lerobot import export_lerobot

    st = EpisodeStore(_one(positional, cfg, "export"))
    if cfg.data.format != "lerobot":
        raise DataUsageError(f"export format '{cfg.data.format}' is not supported; use data.format=lerobot")
    out = _record(cfg, "export")[0]
    info = export_lerobot(st, out, progress=_track("exporting"))
    console.print(f"exported {info['total_episodes']} episodes, {info['total_frames']} frames -> {out} (LeRobotDataset v3)")
    return 0


def cmd_import(cfg: DictConfig, positional: str | None, console) -> int:
    src = _one(positional, cfg, "import")
    out = _record(cfg, "import")[0]
    fmt = cfg.data.format
    if fmt == "lerobot":
        from robot_rl.store.lerobot import import_lerobot

        n = import_lerobot(src, out, image_codec=cfg.data.image_codec or "blosc_zstd", progress=_track("importing"))
    elif fmt == "rosbag":
        from omegaconf import OmegaConf

        from robot_rl.store.rosbag import import_rosbag

        topics = OmegaConf.to_container(cfg.data.topics) if cfg.data.topics is not None else None
        if not topics:
            raise DataUsageError("import of a bag needs data.topics={state.ee_pose: /arm/ee_pose, ...} "
                                 "(spec key -> topic; action: the commanded-target topic)")
        n = import_rosbag(src, out, topics, rate_hz=float(cfg.data.rate_hz), image_codec=cfg.data.image_codec or "blosc_zstd")
    else:
        raise DataUsageError(f"import format '{fmt}' is not one of lerobot, rosbag")
    console.print(f"imported {n} episodes from {src} -> {out}")
    return 0


COMMANDS = {"info": cmd_info, "validate": cmd_validate, "merge": cmd_merge, "split": cmd_split, "filter": cmd_filter,
            "prepare": cmd_prepare, "preview": cmd_preview, "export": cmd_export, "import": cmd_import}


def run(sub: str, cfg: DictConfig, positional: str | None, console) -> int:
    return COMMANDS[sub](cfg, positional, console)


