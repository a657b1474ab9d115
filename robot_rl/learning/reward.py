"""Training the reward classifier (`robot_rl.policies.reward`) from labelled episodes, and turning
it into per-step rewards for fine-tuning (`finetune.reward=classifier`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robot_rl.learning.evaluate import resolve_device
from robot_rl.learning.train import merged_stats
from robot_rl.policies.normalizer import Normalizer
from robot_rl.policies.reward import RewardClassifier, RewardClassifierConfig, step_labels
from robot_rl.store import EpisodeStore, StoreError
from robot_rl.store.sampler import WindowConfig, WindowDataset


def _dataset(stores, keys) -> WindowDataset:
    return WindowDataset([s if isinstance(s, EpisodeStore) else EpisodeStore(s) for s in stores],
                         WindowConfig(n_obs_steps=1, horizon=1, obs_keys=tuple(keys)))


def _episode_table(ds: WindowDataset) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([n for _, _, n in ds.episode_rows])
    success = np.array([bool(ds._opened[si].meta[e].get("success")) for si, e, _ in ds.episode_rows])
    return lengths, success


def _metrics(p: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    pred = p >= threshold
    tp, fp, fn = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    return {"accuracy": float((pred == (y == 1)).mean()) if len(y) else 0.0, "precision": tp / max(1, tp + fp),
            "recall": tp / max(1, tp + fn), "positives": int((y == 1).sum()), "negatives": int((y == 0).sum())}


def train_reward_classifier(stores: list[str], out: str | Path, keys: list[str], steps: int = 2000, batch_size: int = 128,
                            lr: float = 3e-4, seed: int = 0, val_fraction: float = 0.2, device: str = "auto",
                            progress: bool = True, **cfg_overrides) -> tuple[RewardClassifier, dict]:
    """Positives from successful episodes' last steps, negatives from failures (the episodes' success
    labels, as the operator gave them); a held-out share of episodes measures precision and recall."""
    from rich.progress import track

    opened = [EpisodeStore(s) for s in stores]
    ds = _dataset(opened, keys)
    lengths, success = _episode_table(ds)
    if success.all() or not success.any():
        raise StoreError(f"reward classifier: the stores {stores} need both successful and failed episodes "
                         f"({int(success.sum())} of {len(success)} succeeded); record failures too")
    spec = opened[0].spec
    state_keys = tuple(k for k in keys if not k.startswith("image."))
    cfg = RewardClassifierConfig(state_keys=state_keys, image_keys=tuple(k for k in keys if k.startswith("image.")),
                                 state_dims={k: int(np.prod(spec.key(k).shape)) for k in state_keys}, **cfg_overrides)
    labels = step_labels(lengths, success, cfg.positive_steps, cfg.margin_steps)
    rng = np.random.default_rng(seed)
    val_eps = rng.random(len(lengths)) < val_fraction
    val_eps[rng.choice(np.flatnonzero(success))] = False  # at least one success to learn from
    in_val = np.repeat(val_eps, lengths)
    train_ids = np.flatnonzero((labels >= 0) & ~in_val)
    val_ids = np.flatnonzero((labels >= 0) & in_val)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    clf = RewardClassifier(cfg, Normalizer.from_stats(merged_stats(opened), state_keys)).to(dev)
    y_all = torch.as_tensor(labels, dtype=torch.float32)
    pos = train_ids[labels[train_ids] == 1]
    neg = train_ids[labels[train_ids] == 0]
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    losses = []
    clf.train()
    for _ in track(range(steps), description="reward classifier", disable=not progress):
        ids = np.concatenate([rng.choice(pos, batch_size // 2), rng.choice(neg, batch_size - batch_size // 2)])  # balanced
        batch = {k: torch.as_tensor(v).to(dev) for k, v in ds[ids].items() if k in keys}
        loss = torch.nn.functional.binary_cross_entropy_with_logits(clf.logits(batch), y_all[ids].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    report = {"stores": [str(s) for s in stores], "keys": list(keys), "steps": steps, "final_loss": float(np.mean(losses[-20:])),
              "train": _metrics(probabilities(clf, ds, train_ids, dev), labels[train_ids], cfg.threshold),
              "val": _metrics(probabilities(clf, ds, val_ids, dev), labels[val_ids], cfg.threshold)}
    clf.save(out, report)
    return clf, report


@torch.no_grad()
def probabilities(clf: RewardClassifier, ds: WindowDataset, ids: np.ndarray, device, chunk: int = 512) -> np.ndarray:
    keys = [*clf.cfg.state_keys, *clf.cfg.image_keys]
    out = [clf.success_probability({k: torch.as_tensor(v).to(device) for k, v in ds[ids[i:i + chunk]].items() if k in keys})
           .cpu().numpy() for i in range(0, len(ids), chunk)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def classifier_rewards(clf: RewardClassifier, stores: list[str | Path], device: str | torch.device = "cpu") -> np.ndarray:
    """Per step of the stores (WindowDataset order): 1 where the classifier sees success in the
    observation after the step's action (the step's own observation for an episode's last step)."""
    keys = [*clf.cfg.state_keys, *clf.cfg.image_keys]
    ds = _dataset(stores, keys)
    p = probabilities(clf, ds, np.arange(len(ds)), device)
    pos, n = ds.t - ds.start, ds.end - ds.start
    after = np.where(pos + 1 < n, np.arange(len(ds)) + 1, np.arange(len(ds)))
    return (p[after] >= clf.cfg.threshold).astype(np.float32)
