"""One-step consistency policy distilled from a diffusion teacher.

Method: consistency-trajectory distillation (CTM; Kim et al., "Consistency Trajectory Models",
ICLR 2024) specialised to jumps that end at time 0, in the discrete-time parameterisation of Latent
Consistency Models (Luo et al., 2023), as Consistency Policy (Prasad et al., RSS 2024) applies to
action chunks. The student is

    f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂0_θ(x_t, t),   c_skip(0) = 1, c_out(0) = 0,

warm-started from the teacher (same network, dropout on) and trained on two terms, summed:

- trajectory term: d( f_θ(x_t, t), ODE_teacher(x_t; t -> 0) ), the teacher's probability-flow
  ODE solved with deterministic DDIM steps (stride `skip`) from t all the way to 0. Half of each
  batch is the one-step jump exactly as cm1 samples it: pure noise z ~ N(0, I) at the one-step
  time 0.8 T, whose target is the chunk the teacher's own deterministic sampler (diffusers DDIM,
  T / skip steps: ddim10 by default) draws from the same z — direct distillation of the sampler's
  noise-to-chunk map (Luhman & Luhman, 2021), so the student is trained on the input it meets at
  inference and copies the teacher mode for mode. The other half starts from noised data at 2/3 or
  1/3 of the one-step time or a random time (the inputs of chained sampling);
- local consistency term (consistency distillation, Song et al., ICML 2023):
  d( f_θ(x_{t+k}, t+k), f_θ⁻(Φ_teacher(x_{t+k}; t+k -> t), t) ), one DDIM step of the teacher,
  θ⁻ an EMA of the student (decay 0.95).

d is the pseudo-Huber distance. The trajectory term anchors the one-step jump from pure noise,
which the local term alone reaches only after many bootstrapping hops. Sampling: one step from
N(0, I) at t = 0.8 T (see START_FRACTION), or a few chained steps re-noising the estimate
(cm3: t = 80, 53, 26).
"""

from __future__ import annotations

import copy

import torch
from robot_rl.policies.diffusion import DiffusionPolicy, gaussian, masked_mean, parse_sampler

SIGMA_DATA = 0.5
TIME_SCALE = 10.0
START_FRACTION = 0.8  # one-step sampling starts at t = 0.8 T: with the cosine schedule ᾱ(T) ≈ 2e-7, and
# recovering x0 from an ε-prediction there amplifies errors ~2000x; at 0.8 T the factor is ~3.


def start_time(T: int) -> int:
    return int(START_FRACTION * T)


def soft_clip(x: torch.Tensor, limit: float = 1.5) -> torch.Tensor:
    """Bounded like clamp, but with a gradient everywhere (a clamped student stops learning)."""
    return limit * torch.tanh(x / limit)


def boundary_coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ts = t.float() * TIME_SCALE
    c_skip = SIGMA_DATA**2 / (ts**2 + SIGMA_DATA**2)
    c_out = ts / torch.sqrt(ts**2 + SIGMA_DATA**2)
    return c_skip, c_out


class ConsistencyPolicy(DiffusionPolicy):
    kind = "consistency"

    def consistency_fn(self, net, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1)
        eps = net(x, t, cond)
        x0 = soft_clip((x - (1 - a).sqrt() * eps) / a.sqrt())
        c_skip, c_out = boundary_coefficients(t)
        return c_skip.view(-1, 1, 1) * x + c_out.view(-1, 1, 1) * x0

    @torch.no_grad()
    def sample_normalized(self, cond: torch.Tensor, sampler: str = "cm1", generator: torch.Generator | None = None,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        kind, steps = parse_sampler(sampler)
        if kind != "cm":
            return super().sample_normalized(cond, sampler, generator, noise)
        b, T = cond.shape[0], self.cfg.num_train_timesteps
        shape = (b, self.cfg.horizon, self.cfg.action_dim)
        x = noise if noise is not None else gaussian(shape, generator, cond.device)
        t0 = start_time(T)
        times = [int(t0 - i * t0 / steps) for i in range(steps)]  # cm1 -> 80; cm3 -> 80, 53, 26
        a0 = None
        for i, t in enumerate(times):
            if i:
                a = self.alphas_cumprod[t]
                z = gaussian(shape, generator, cond.device)
                x = a.sqrt() * a0 + (1 - a).sqrt() * z
            a0 = self.consistency_fn(self.net, x, torch.full((b,), t, device=cond.device), cond).clamp(-1, 1)
        return a0


    def compute_loss(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        """Fine-tuning without a teacher (advantage-weighted, robot_rl.learning.finetune): the student's
        jump to time 0 regresses the data action from a noised copy of it, half the batch at the
        one-step start time, half at a random time, so both cm1 and chained sampling follow the data."""
        T = self.cfg.num_train_timesteps
        cond = self.condition(batch)
        a0 = self.normalizer.normalize("action", batch["action"].float())
        b, t0 = a0.shape[0], start_time(T)
        t = torch.where(torch.arange(b, device=a0.device) < b // 2, t0, torch.randint(1, t0 + 1, (b,), device=a0.device))
        a = self.alphas_cumprod[t].view(-1, 1, 1)
        x = a.sqrt() * a0 + (1 - a).sqrt() * torch.randn_like(a0)
        pred = self.consistency_fn(self.net, x, t, cond)
        return masked_mean((pred - a0) ** 2, self.pad_mask(batch), weights)


class Distiller:
    """Holds teacher (frozen), student and target network; `loss(batch)` is one CD objective."""

    def __init__(self, teacher: DiffusionPolicy, student: ConsistencyPolicy, skip: int = 10, target_decay: float = 0.95,
                 huber_c: float = 0.01):
        self.teacher, self.student = teacher.eval(), student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.target = copy.deepcopy(student.net).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.skip, self.decay, self.c = skip, target_decay, huber_c

    @torch.no_grad()
    def teacher_ode(self, x: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (the PF-ODE's first-order solver) from t down to 0, stride `skip`."""
        ac = self.student.alphas_cumprod
        b = x.shape[0]
        x0 = x
        while True:
            a = ac[t]
            eps = self.teacher.net(x, torch.full((b,), t, device=x.device), cond)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            if t == 0:
                return x0
            t_next = max(0, t - self.skip)
            a_next = ac[t_next]
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clipped x0
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            t = t_next

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s, T = self.student, self.student.cfg.num_train_timesteps
        cond = s.condition(batch)
        with torch.no_grad():
            cond_teacher = self.teacher.condition(batch)
        a0 = s.normalizer.normalize("action", batch["action"].float())
        b = a0.shape[0]
        pad = s.pad_mask(batch)
        # trajectory term. One-step half: pure noise at the one-step time -> the teacher sampler's chunk
        # from that noise. Other half: noised data at another start time -> the teacher's ODE from there.
        t0, half = start_time(T), b // 2
        z = torch.randn_like(a0[:half])
        target_1 = self.teacher.sample_normalized(cond_teacher[:half], f"ddim{T // self.skip}", noise=z)
        pred_1 = s.consistency_fn(s.net, z, torch.full((half,), t0, device=a0.device), cond[:half])
        loss_g = masked_mean(self.distance(pred_1, target_1), None if pad is None else pad[:half])
        t_g = [2 * t0 // 3, t0 // 3, int(torch.randint(1, t0 + 1, (1,)))][int(torch.randint(0, 3, (1,)))]
        ag = s.alphas_cumprod[t_g]
        x_g = ag.sqrt() * a0[half:] + (1 - ag).sqrt() * torch.randn_like(a0[half:])
        target_g = self.teacher_ode(x_g, t_g, cond_teacher[half:])
        pred_g = s.consistency_fn(s.net, x_g, torch.full((b - half,), t_g, device=a0.device), cond[half:])
        loss_g = loss_g + masked_mean(self.distance(pred_g, target_g), None if pad is None else pad[half:])
        # local consistency term
        t_hi = torch.randint(self.skip, t0 + 1, (b,), device=a0.device)
        t_lo = t_hi - self.skip
        z = torch.randn_like(a0)
        ahi = s.alphas_cumprod[t_hi].view(-1, 1, 1)
        x_hi = ahi.sqrt() * a0 + (1 - ahi).sqrt() * z
        with torch.no_grad():  # one DDIM (PF-ODE) step of the teacher: t_hi -> t_lo
            eps = self.teacher.net(x_hi, t_hi, cond_teacher)
            x0 = ((x_hi - (1 - ahi).sqrt() * eps) / ahi.sqrt()).clamp(-1, 1)
            alo = s.alphas_cumprod[t_lo].view(-1, 1, 1)
            x_lo = alo.sqrt() * x0 + (1 - alo).sqrt() * eps
            target = s.consistency_fn(self.target, x_lo, t_lo, cond.detach())
        pred = s.consistency_fn(s.net, x_hi, t_hi, cond)
        return loss_g + masked_mean(self.distance(pred, target), pad)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber: quadratic near 0, linear for large errors."""
        return torch.sqrt((a - b) ** 2 + self.c**2) - self.c

    @torch.no_grad()
    def update_target(self) -> None:
        for pt, ps in zip(self.target.parameters(), self.student.net.parameters()):
            pt.mul_(self.decay).add_(ps.detach(), alpha=1 - self.decay)
