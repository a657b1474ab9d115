"""Policy latency per action chunk, batch 1, the same network for every sampler, side by side:
one-step consistency (cm1) vs DDIM-10 vs DDPM-100.

- state: the denoising head alone (observation features computed once, as in deployment);
- image: end to end per chunk with 2 cameras at 84 px (76 px crop) + proprioception, each camera
  frame encoded once when it arrives (so a chunk pays for the newest frames plus the head);
  `image.encoder_share` is the encoders' part of the one-step chunk time.
- fleet: N robots served by one model (the policy server's `robots:=`), the state policy's cm1 chunk
  for all of them in one batch (`plan_batch`) vs one after another;
- serving flags: the same chunk under fp16 / bf16 autocast and `torch.compile` (inductor) next to
  eager fp32 (`flags.*`: the chunk's largest difference from fp32 eager on the same inputs and
  noise, the first call's time — compilation — and the latency; on CUDA also `reduce-overhead`,
  CUDA graphs). On the CPU these are equivalence checks more than speed-ups; the flags are for a GPU.
CPU always; CUDA too when present (`cuda.*` keys). Weights are random: latency does not depend on
them. Default run well under 240 s.

    python benchmarks/policy_latency.py [--repeats 30]
"""
# ruff: noqa: I001

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

from robot_rl.learning.evaluate import ChunkAgent, accelerate, plan_batch  # noqa: E402
from robot_rl.policies.consistency import ConsistencyPolicy  # noqa: E402
from robot_rl.policies.diffusion import PolicyConfig  # noqa: E402
from robot_rl.policies.normalizer import Normalizer  # noqa: E402

STATE = {"state.joint_pos": 7, "state.ee_pose": 7, "state.gripper": 1, "state.wrench": 6, "state.object.cube": 7}


def make(image: bool, device: torch.device) -> ConsistencyPolicy:
    state = {"state.ee_pose": 7, "state.gripper": 1} if image else STATE
    cfg = PolicyConfig(state_keys=tuple(state), state_dims=state, image_keys=("image.front", "image.wrist") if image else ())
    stats = {k: {"min": [-1] * d, "max": [1] * d} for k, d in {**state, "action": 7}.items()}
    return ConsistencyPolicy(cfg, Normalizer.from_stats(stats, [*state, "action"])).to(device).eval()


def timed(fn, repeats: int, device: torch.device) -> np.ndarray:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(out)


@torch.no_grad()
def bench(device: torch.device, repeats: int) -> dict:
    res: dict[str, float] = {}
    # ---- state: the denoising head ----
    p = make(False, device)
    batch = {k: torch.randn(1, 2, d, device=device) for k, d in STATE.items()}
    cond = p.condition(batch)
    for sampler, n in (("cm1", repeats * 3), ("ddim10", repeats), ("ddpm100", max(5, repeats // 5))):
        p.sample_normalized(cond, sampler)  # warm-up
        res[f"state.{sampler}_ms"] = float(np.median(timed(lambda s=sampler: p.sample_normalized(cond, s), n, device)))
    # ---- image: newest frames encoded + head ----
    p = make(True, device)
    frames = {k: torch.randint(0, 255, (1, 84, 84, 3), dtype=torch.uint8, device=device) for k in p.cfg.image_keys}
    cached = {k: p.encoder.encode_frames(k, frames[k]) for k in p.cfg.image_keys}
    state = {k: torch.randn(1, 2, d, device=device) for k, d in {"state.ee_pose": 7, "state.gripper": 1}.items()}

    def chunk(sampler: str):
        feats = {}
        for k in p.cfg.image_keys:  # the newest frame of each camera; the previous one is cached
            new = p.encoder.encode_frames(k, frames[k])
            feats[k] = torch.stack([cached[k][0], new[0]])[None]
        return p.sample_normalized(p.condition(state, feats), sampler)

    def encoders():
        for k in p.cfg.image_keys:
            p.encoder.encode_frames(k, frames[k])

    for sampler, n in (("cm1", repeats * 2), ("ddim10", repeats), ("ddpm100", max(5, repeats // 5))):
        chunk(sampler)
        t = timed(lambda s=sampler: chunk(s), n, device)
        res[f"image.{sampler}_ms"] = float(np.median(t))
        if sampler == "cm1":
            res["image.cm1_p99_ms"] = float(np.percentile(t, 99))
    enc = float(np.median(timed(encoders, repeats, device)))
    res["image.encoder_ms"] = enc
    res["image.encoder_share"] = enc / res["image.cm1_ms"]
    for m in ("state", "image"):
        res[f"{m}.speedup_vs_ddim10"] = res[f"{m}.ddim10_ms"] / res[f"{m}.cm1_ms"]
        res[f"{m}.speedup_vs_ddpm100"] = res[f"{m}.ddpm100_ms"] / res[f"{m}.cm1_ms"]
    res.update(serving(device, repeats))
    return {k: round(v, 3) for k, v in res.items()}


def _agents(policy, n: int, device: torch.device, precision: str = "fp32") -> list[ChunkAgent]:
    obs = {k: np.zeros(d, np.float32) for k, d in STATE.items()}
    agents = [ChunkAgent(policy, "cm1", device, precision=precision) for _ in range(n)]
    for k, a in enumerate(agents):
        a.reset(np.random.default_rng(k))
        a.observe(obs)
    return agents


def serving(device: torch.device, repeats: int) -> dict[str, float]:
    """The policy server's paths: several robots in one batch, and the GPU flags."""
    res: dict[str, float] = {}
    p = make(False, device)
    for n in (4, 16):
        agents = _agents(p, n, device)
        plan_batch(agents)
        res[f"fleet.batch{n}_ms"] = float(np.median(timed(lambda a=agents: plan_batch(a), repeats * 2, device)))
        res[f"fleet.sequential{n}_ms"] = float(np.median(timed(
            lambda a=agents: [plan_batch([x]) for x in a], repeats, device)))
        res[f"fleet.speedup{n}"] = res[f"fleet.sequential{n}_ms"] / res[f"fleet.batch{n}_ms"]
    reference = plan_batch(_agents(p, 4, device))[0]  # fp32 eager: what each flag's chunk is compared with

    def flag(name: str, policy, precision: str = "fp32") -> None:
        """Chunk difference from fp32 eager on the same inputs and noise (action units), then latency."""
        t0 = time.perf_counter()
        res[f"flags.{name}_max_diff"] = float(np.abs(plan_batch(_agents(policy, 4, device, precision))[0] - reference).max())
        res[f"flags.{name}_first_call_s"] = time.perf_counter() - t0  # compilation, for the compiled ones
        agents = _agents(policy, 1, device, precision)
        plan_batch(agents)
        res[f"flags.{name}_ms"] = float(np.median(timed(lambda a=agents: plan_batch(a), repeats * 2, device)))

    for precision in ("fp32", "bf16", "fp16"):
        flag(precision, p, precision)
    modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)  # CUDA graphs on a GPU
    for mode in modes:
        compiled = accelerate(copy.deepcopy(p), mode)  # the same weights as the eager reference
        flag(f"compiled_{mode.replace('-', '_')}", compiled)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = bench(torch.device("cpu"), args.repeats)
    out["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        out.update({f"cuda.{k}": v for k, v in bench(torch.device("cuda"), args.repeats).items()})
    emit("policy_latency", out, "python benchmarks/policy_latency.py")


if __name__ == "__main__":
    main()
