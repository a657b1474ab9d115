"""Self-contained checkpoints: a folder with `model.safetensors` (weights and normaliser),
`config.json` (policy kind and config, the spec's policy subset and its hash, training record)
and, for resuming, `optimizer.safetensors` + `train_state.json`. Never pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from robot_rl.policies.consistency import ConsistencyPolicy
from robot_rl.policies.diffusion import BCPolicy, DiffusionPolicy, PolicyConfig
from robot_rl.policies.normalizer import Normalizer
from safetensors.torch import load_file, save_file

KINDS = {"diffusion": DiffusionPolicy, "consistency": ConsistencyPolicy, "bc": BCPolicy}


def default_sampler(kind: str) -> str:
    """The sampler a policy of this kind runs unless told otherwise."""
    return {"consistency": "cm1", "bc": "bc"}.get(kind, "ddim10")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: one line naming the folder and the problem."""


def save_policy(policy: DiffusionPolicy, path: str | Path, spec_subset: dict, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}, str(tmp))
    tmp.replace(path / "model.safetensors")
    from robot_rl.spec import subset_hash

    cfg = {"kind": policy.kind, "policy": policy.cfg.to_dict(), "normalizer_keys": policy.normalizer.keys,
           "spec_subset": spec_subset, "spec_hash": subset_hash(spec_subset), **(extra or {})}
    cfg["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    (path / "config.json.tmp").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (path / "config.json.tmp").replace(path / "config.json")
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"checkpoint {path}: no config.json (is this a robot_rl checkpoint folder?)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({e})") from None


def load_policy(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> DiffusionPolicy:
    path = Path(path)
    cfg = read_config(path)
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"checkpoint {path}: unknown policy kind {kind!r}; expected one of {sorted(KINDS)}")
    weights = path / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"checkpoint {path}: model.safetensors is missing")
    if verify and cfg.get("weights_sha256") and hashlib.sha256(weights.read_bytes()).hexdigest() != cfg["weights_sha256"]:
        raise CheckpointError(f"checkpoint {path}: model.safetensors does not match the sha256 in config.json")
    pcfg = PolicyConfig.from_dict(cfg["policy"])
    state = load_file(str(weights))
    policy = KINDS[kind](pcfg, Normalizer.from_state_dict(state, cfg["normalizer_keys"]))
    missing, unexpected = policy.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("alphas_cumprod")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    policy.spec_subset = cfg["spec_subset"]
    policy.checkpoint_config = cfg
    return policy.to(device).eval()


def save_train_state(path: str | Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Optimizer tensors to safetensors, the rest (step, lr schedule, seeds) to JSON."""
    path = Path(path)
    tensors, meta = {}, {"param_groups": optimizer.state_dict()["param_groups"], "state_keys": {}}
    for pid, st in optimizer.state_dict()["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{name}"] = v.detach().contiguous().cpu()
            else:
                meta["state_keys"].setdefault(str(pid), {})[name] = v
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "train_state.json").write_text(json.dumps({**state, "optimizer": meta}, indent=2))


def load_train_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    path = Path(path)
    state = json.loads((path / "train_state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    for pid, extra in state["optimizer"]["state_keys"].items():
        opt_state.setdefault(int(pid), {}).update(extra)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    return state
