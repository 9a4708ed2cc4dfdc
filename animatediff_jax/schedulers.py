"""Diffusion samplers as pure JAX functions, numerically matching diffusers 0.42.

A scheduler is built once on the host (numpy, float64) into an immutable pytree, `Scheduler`,
holding the timesteps and, per inference step, every scalar the update needs. The update
itself is a pure function of that pytree, a carry of fixed-shape arrays (multistep history)
and the traced step index `i`, so the whole sampling loop fits in one `jax.lax.scan`:

    sched = make_scheduler("dpmpp_2m", 25, use_karras_sigmas=True)
    x = noise * sched.init_noise_sigma
    carry = init_carry(sched, x)
    def body(state, i):
        x, carry = state
        eps = unet(scale_model_input(sched, i, x), sched.timesteps[i])
        return step(sched, carry, i, eps, x, jax.random.fold_in(key, i)), None
    (x, _), _ = jax.lax.scan(body, (x, carry), jnp.arange(sched.num_inference_steps))

Loop over all of `sched.timesteps` (PNDM's PLMS schedule has one more entry than the requested
number of steps, as in diffusers). Timesteps are int32, except the Euler family's, which are
float32 (diffusers interpolates fractional timesteps there). The update runs in float32 whatever
the sample dtype and returns the sample's dtype. Stochastic samplers (DDIM with eta > 0, Euler
ancestral, LCM) draw standard normal noise from `key`, so pass a fresh key per step.

Defaults are the original AnimateDiff's scheduler: its `scripts/animate.py` builds
`DDIMScheduler(**noise_scheduler_kwargs)` from `configs/inference/inference-v{1,2,3}.yaml`
(beta_schedule "linear" from 0.00085 to 0.012, steps_offset 1, clip_sample False) and leaves every
other field at diffusers' class default: 1000 train steps, "leading" spacing and
**set_alpha_to_one True** (the last DDIM step lands on alpha = 1). That is the `"animatediff"`
preset. SD1.5's own `scheduler/scheduler_config.json`, which diffusers' AnimateDiff docs load with
`from_pretrained`, says set_alpha_to_one False: the `"diffusers_sd15"` preset
(`make_scheduler("ddim", 25, preset="diffusers_sd15")`, or `scheduler_options={"preset":
"diffusers_sd15"}` in a sample config). A preset sets the fields it names on every sampler that
has them (DDIM, PNDM, LCM); explicit options override it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)
_SPECIFIC: dict[str, dict[str, Any]] = {
    "ddim": dict(eta=0.0, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True),
    "euler": dict(use_karras_sigmas=False),
    "euler_ancestral": dict(),
    "dpmpp_2m": dict(
        use_karras_sigmas=False,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="zero",
    ),
    "pndm": dict(skip_prk_steps=True, set_alpha_to_one=True),
    "lcm": dict(
        original_inference_steps=50,
        timestep_scaling=10.0,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
    ),
}
# Named defaults (see the module docstring): the original AnimateDiff's, and SD1.5's scheduler_config.json.
PRESETS: dict[str, dict[str, Any]] = {
    "animatediff": dict(set_alpha_to_one=True),
    "diffusers_sd15": dict(set_alpha_to_one=False),
}
_CHOICES = dict(
    beta_schedule=("linear", "scaled_linear", "squaredcos_cap_v2"),
    prediction_type=("epsilon", "v_prediction"),
    timestep_spacing=("leading", "linspace", "trailing"),
    solver_type=("midpoint", "heun"),
    final_sigmas_type=("zero", "sigma_min"),
    skip_prk_steps=(True,),
)
SCHEDULERS = tuple(_SPECIFIC)


@struct.dataclass
class Scheduler:
    """Host-built tables for one sampler and one number of steps (a pytree; safe to pass to jit).

    `coefs` maps a name to a `[num_inference_steps]` float32 array of per-step scalars; which
    names exist depends on `kind`. `alphas_cumprod` is the training schedule, for `add_noise`.
    """

    timesteps: Array
    coefs: dict[str, Array]
    alphas_cumprod: Array
    kind: str = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)
    stochastic: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float | None = struct.field(pytree_node=False, default=None)

    @property
    def num_inference_steps(self) -> int:
        """Length of the sampling loop (for PNDM one more than the steps asked for)."""
        return self.timesteps.shape[0]


# ----------------------------------------------------------------------------------------------
# Host side: the training schedule and the inference timesteps, computed as diffusers does.
# ----------------------------------------------------------------------------------------------


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "linear",
) -> np.ndarray:
    """The float32 cumulative product of (1 - beta) of the training noise schedule.

    diffusers builds betas with a float32 `torch.linspace` and multiplies in double precision;
    here the float64 linspace is rounded once, which agrees to an ulp or so.
    """
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n).astype(np.float32)
    elif beta_schedule == "scaled_linear":
        betas = np.square(np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32))
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32
        )
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not one of {_CHOICES['beta_schedule']}")
    return np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)


def _spaced_timesteps(n: int, cfg: dict[str, Any]) -> np.ndarray:
    """DDIM/Euler-style spacing of `n` timesteps, descending (float64; callers cast)."""
    t_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, t_train - 1, n).round()[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (t_train // n)).round()[::-1].astype(np.float64) + cfg["steps_offset"]
    return np.round(np.arange(t_train, 0, -t_train / n)) - 1  # trailing


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma by interpolating log-sigma (diffusers' formula)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _train_sigmas(ac: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), in float32 like diffusers' table."""
    return (((1 - ac) / ac) ** 0.5).astype(np.float32)


def _alpha_prev(ac: np.ndarray, t: np.ndarray, final: float) -> np.ndarray:
    t = np.asarray(t)
    return np.where(t >= 0, ac[np.clip(t, 0, None)], final).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Builders, one per sampler: host-side float64 arithmetic into per-step float32 scalars.
# ----------------------------------------------------------------------------------------------


def _build_ddim(n: int, cfg: dict[str, Any], ac: np.ndarray) -> dict[str, Any]:
    ts = _spaced_timesteps(n, cfg).astype(np.int64)
    final = 1.0 if cfg["set_alpha_to_one"] else float(ac[0])
    a_t = ac[ts].astype(np.float64)
    a_prev = _alpha_prev(ac, ts - cfg["num_train_timesteps"] // n, final)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = cfg["eta"] * variance**0.5
    coefs = dict(
        sqrt_a=a_t**0.5,
        sqrt_b=(1 - a_t) ** 0.5,
        sqrt_a_prev=a_prev**0.5,
        dir_coef=(1 - a_prev - std**2) ** 0.5,
        std=std,
    )
    clip = cfg["clip_sample_range"] if cfg["clip_sample"] else None
    return dict(timesteps=ts, coefs=coefs, stochastic=cfg["eta"] > 0, clip_sample_range=clip)


def _euler_sigmas(n: int, cfg: dict[str, Any], ac: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Timesteps, sigmas (n + 1, ending in 0) and init_noise_sigma of the Euler samplers."""
    t_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":  # diffusers builds this one in float32
        ts = np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    else:
        ts = _spaced_timesteps(n, cfg).astype(np.float32).astype(np.float64)
    train = _train_sigmas(ac)
    sig = np.interp(ts, np.arange(t_train), train)
    if cfg.get("use_karras_sigmas"):
        sig = _karras(sig[-1], sig[0], n)
        ts = _sigma_to_t(sig, np.log(train))
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
    smax = float(sigmas.max())
    init = smax if spacing in ("linspace", "trailing") else float(np.float32(smax) ** 2 + 1) ** 0.5
    return ts.astype(np.float32), sigmas, init


def _build_euler(n: int, cfg: dict[str, Any], ac: np.ndarray) -> dict[str, Any]:
    ts, sigmas, init = _euler_sigmas(n, cfg, ac)
    return dict(timesteps=ts, coefs=dict(sigma=sigmas[:-1], sigma_next=sigmas[1:]), init_noise_sigma=init)


def _build_euler_ancestral(n: int, cfg: dict[str, Any], ac: np.ndarray) -> dict[str, Any]:
    ts, sigmas, init = _euler_sigmas(n, cfg, ac)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    s_down = (s_to**2 - s_up**2) ** 0.5
    coefs = dict(sigma=s_from, sigma_up=s_up, sigma_down=s_down)
    return dict(timesteps=ts, coefs=coefs, init_noise_sigma=init, stochastic=True)


def _build_dpmpp_2m(n: int, cfg: dict[str, Any], ac: np.ndarray) -> dict[str, Any]:
    t_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, t_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = t_train // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    else:
        ts = np.arange(t_train, 0, -t_train / n).round().astype(np.int64) - 1
    train = _train_sigmas(ac)
    if cfg["use_karras_sigmas"]:
        sig = _karras(float(train[0]), float(train[-1]), n)
        ts = _sigma_to_t(sig, np.log(train)).round().astype(np.int64)
    else:
        sig = np.interp(ts, np.arange(t_train), train)
    last = float(_train_sigmas(ac[:1])[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
    n = len(ts)

    # Step i goes from sigmas[i] to sigmas[i + 1]. A final sigma of 0 gives lambda = +inf and a
    # pure x0 step; the step-size ratio r0 only matters on second-order steps.
    alpha = 1 / (sigmas**2 + 1) ** 0.5
    sigma = sigmas * alpha
    idx = np.arange(n)
    final_first_order = (idx == n - 1) & (
        cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
    )
    second = (idx >= 1) & ~final_first_order
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigma)
        h = lam[1:] - lam[:-1]
        em1 = np.exp(-h) - 1.0
        r0 = np.concatenate([[1.0], (lam[1:n] - lam[: n - 1]) / h[1:]])
        if cfg["solver_type"] == "midpoint":
            d1 = -0.5 * alpha[1:] * em1
        else:
            d1 = alpha[1:] * (em1 / h + 1.0)
        d1 = np.where(second, d1 / r0, 0.0)
    coefs = dict(
        alpha_s=alpha[:-1],
        sigma_s=sigma[:-1],
        c_sample=sigma[1:] / sigma[:-1],
        c_d0=-alpha[1:] * em1,
        c_d1=d1,
    )
    return dict(timesteps=ts, coefs=coefs)


def _build_pndm(n: int, cfg: dict[str, Any], ac: np.ndarray) -> dict[str, Any]:
    t_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        base = np.linspace(0, t_train - 1, n).round()
    elif spacing == "leading":
        base = (np.arange(0, n) * (t_train // n)).round() + cfg["steps_offset"]
    else:
        base = np.round(np.arange(t_train, 0, -t_train / n))[::-1] - 1
    base = base.astype(np.int64)  # ascending
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
    m = len(ts)
    ratio = t_train // n
    # The PLMS step at index 1 redoes step 0's interval with the averaged output (a Heun step).
    t_used, t_prev = ts.copy(), ts - ratio
    if m > 1:
        t_used[1], t_prev[1] = ts[1] + ratio, ts[1]
    final = 1.0 if cfg["set_alpha_to_one"] else float(ac[0])
    a_t = ac[t_used].astype(np.float64)
    a_prev = _alpha_prev(ac, t_prev, final)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
    # Adams-Bashforth weights on (current output, newest stored, older, oldest).
    w = np.zeros((m, 4))
    w[0] = (1, 0, 0, 0)
    if m > 1:
        w[1] = (0.5, 0.5, 0, 0)
    if m > 2:
        w[2] = (1.5, -0.5, 0, 0)
    if m > 3:
        w[3] = (23 / 12, -16 / 12, 5 / 12, 0)
    w[4:] = (55 / 24, -59 / 24, 37 / 24, -9 / 24)
    coefs = dict(
        sqrt_a=a_t**0.5,
        sqrt_b=b_t**0.5,
        sample_coef=(a_prev / a_t) ** 0.5,
        eps_coef=(a_prev - a_t) / denom,
        w0=w[:, 0],
        w1=w[:, 1],
        w2=w[:, 2],
        w3=w[:, 3],
    )
    return dict(timesteps=ts, coefs=coefs)


def _build_lcm(n: int, cfg: dict[str, Any], ac: np.ndarray) -> dict[str, Any]:
    t_train, orig = cfg["num_train_timesteps"], cfg["original_inference_steps"]
    if orig > t_train or n > orig:
        raise ValueError(f"lcm needs num_inference_steps <= original_inference_steps ({orig}) <= {t_train}")
    origin = (np.arange(1, orig + 1) * (t_train // orig) - 1)[::-1].copy()
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    final = 1.0 if cfg["set_alpha_to_one"] else float(ac[0])
    a_t = ac[ts].astype(np.float64)
    a_prev = _alpha_prev(ac, np.concatenate([ts[1:], ts[-1:]]), final)
    last = np.arange(n) == n - 1
    scaled = ts * float(cfg["timestep_scaling"])
    coefs = dict(
        sqrt_a=a_t**0.5,
        sqrt_b=(1 - a_t) ** 0.5,
        c_skip=0.25 / (scaled**2 + 0.25),
        c_out=scaled / (scaled**2 + 0.25) ** 0.5,
        # The last step returns the denoised sample itself.
        sqrt_a_prev=np.where(last, 1.0, a_prev**0.5),
        sqrt_b_prev=np.where(last, 0.0, (1 - a_prev) ** 0.5),
    )
    clip = cfg["clip_sample_range"] if cfg["clip_sample"] else None
    return dict(timesteps=ts, coefs=coefs, stochastic=True, clip_sample_range=clip)


_BUILDERS = dict(
    ddim=_build_ddim,
    euler=_build_euler,
    euler_ancestral=_build_euler_ancestral,
    dpmpp_2m=_build_dpmpp_2m,
    pndm=_build_pndm,
    lcm=_build_lcm,
)


def scheduler_config(name: str, *, preset: str = "animatediff", **options: Any) -> dict[str, Any]:
    """The full diffusers config of sampler `name`: defaults, then `PRESETS[preset]`, then `options`.

    Every key is a diffusers constructor argument of that scheduler (DDIM's `eta` aside, a step
    argument there), so `diffusers.DDIMScheduler(**cfg)` is the reference the tests compare with.
    """
    if name not in _SPECIFIC:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown scheduler preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    cfg = {**_COMMON, **_SPECIFIC[name]}
    unknown = sorted(set(options) - set(cfg))
    if unknown:
        raise ValueError(
            f"scheduler {name!r} has no option {', '.join(unknown)}; valid options: {sorted(cfg) + ['preset']}"
        )
    cfg.update({k: v for k, v in PRESETS[preset].items() if k in cfg})
    cfg.update(options)
    for key, choices in _CHOICES.items():
        if key in cfg and cfg[key] not in choices:
            raise ValueError(f"{key}={cfg[key]!r} is not supported; choose from {choices}")
    return cfg


def make_scheduler(name: str, num_inference_steps: int, **options: Any) -> Scheduler:
    """Builds sampler `name` for `num_inference_steps` steps.

    `options` are diffusers' config names, plus `preset` ("animatediff", the default, or
    "diffusers_sd15"): see `scheduler_config`.
    """
    cfg = scheduler_config(name, **options)
    if not 1 <= num_inference_steps <= cfg["num_train_timesteps"]:
        raise ValueError(f"num_inference_steps must be in [1, {cfg['num_train_timesteps']}]")
    ac = make_alphas_cumprod(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"])
    built = _BUILDERS[name](num_inference_steps, cfg, ac)
    ts = built.pop("timesteps")
    ts = jnp.asarray(ts, jnp.float32 if ts.dtype == np.float32 else jnp.int32)
    coefs = {k: jnp.asarray(np.asarray(v, np.float64), jnp.float32) for k, v in built.pop("coefs").items()}
    return Scheduler(
        timesteps=ts,
        coefs=coefs,
        alphas_cumprod=jnp.asarray(ac),
        kind=name,
        prediction_type=cfg["prediction_type"],
        **built,
    )


# ----------------------------------------------------------------------------------------------
# Device side: pure, traceable functions of (scheduler, carry, step index).
# ----------------------------------------------------------------------------------------------


def init_carry(sched: Scheduler, sample: Array) -> dict[str, Array]:
    """Zeroed multistep history for `sample`'s shape (empty for single-step samplers)."""
    z = jnp.zeros(sample.shape, jnp.float32)
    if sched.kind == "dpmpp_2m":
        return dict(prev_x0=z)
    if sched.kind == "pndm":
        return dict(ets=jnp.zeros((3,) + sample.shape, jnp.float32), cur_sample=z)
    return {}


def scale_model_input(sched: Scheduler, i: Array | int, sample: Array) -> Array:
    """The UNet's input at step `i`: the Euler family works on sigma-scaled samples."""
    if sched.kind in ("euler", "euler_ancestral"):
        sigma = sched.coefs["sigma"][i]
        return (sample.astype(jnp.float32) / (sigma**2 + 1) ** 0.5).astype(sample.dtype)
    return sample


def _noise(key: Array | None, shape: tuple[int, ...]) -> Array:
    if key is None:
        raise ValueError("this sampler is stochastic: pass a PRNG key to step()")
    return jax.random.normal(key, shape, jnp.float32)


def _x0_and_eps(sched: Scheduler, c: dict[str, Array], out: Array, x: Array) -> tuple[Array, Array]:
    """Predicted clean sample and noise from the model output (DDPM parametrisation)."""
    if sched.prediction_type == "epsilon":
        return (x - c["sqrt_b"] * out) / c["sqrt_a"], out
    return c["sqrt_a"] * x - c["sqrt_b"] * out, c["sqrt_a"] * out + c["sqrt_b"] * x


def step(
    sched: Scheduler,
    carry: dict[str, Array],
    i: Array | int,
    model_output: Array,
    sample: Array,
    key: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """One sampler update from step `i`'s sample to step `i + 1`'s; returns (prev_sample, carry)."""
    c = {k: v[i] for k, v in sched.coefs.items()}
    out = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    kind = sched.kind

    if kind in ("ddim", "lcm"):
        x0, eps = _x0_and_eps(sched, c, out, x)
        if sched.clip_sample_range is not None:
            x0 = jnp.clip(x0, -sched.clip_sample_range, sched.clip_sample_range)
        if kind == "ddim":
            prev = c["sqrt_a_prev"] * x0 + c["dir_coef"] * eps
            if sched.stochastic:
                prev = prev + c["std"] * _noise(key, x.shape)
        else:
            denoised = c["c_out"] * x0 + c["c_skip"] * x
            prev = c["sqrt_a_prev"] * denoised + c["sqrt_b_prev"] * _noise(key, x.shape)
    elif kind in ("euler", "euler_ancestral"):
        sigma = c["sigma"]
        if sched.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        derivative = (x - x0) / sigma
        if kind == "euler":
            prev = x + derivative * (c["sigma_next"] - sigma)
        else:
            prev = x + derivative * (c["sigma_down"] - sigma) + _noise(key, x.shape) * c["sigma_up"]
    elif kind == "dpmpp_2m":
        if sched.prediction_type == "epsilon":
            x0 = (x - c["sigma_s"] * out) / c["alpha_s"]
        else:
            x0 = c["alpha_s"] * x - c["sigma_s"] * out
        prev = c["c_sample"] * x + c["c_d0"] * x0 + c["c_d1"] * (x0 - carry["prev_x0"])
        carry = dict(prev_x0=x0)
    elif kind == "pndm":
        ets, first = carry["ets"], i == 0
        heun = i == 1  # redo step 0's interval from its sample with the averaged output
        eps = c["w0"] * out + c["w1"] * ets[2] + c["w2"] * ets[1] + c["w3"] * ets[0]
        x_in = jnp.where(heun, carry["cur_sample"], x)
        if sched.prediction_type == "v_prediction":
            eps = c["sqrt_a"] * eps + c["sqrt_b"] * x_in
        prev = c["sample_coef"] * x_in - c["eps_coef"] * eps
        pushed = jnp.concatenate([ets[1:], out[None]], axis=0)
        carry = dict(
            ets=jnp.where(heun, ets, pushed),
            cur_sample=jnp.where(first, x, carry["cur_sample"]),
        )
    else:  # pragma: no cover - make_scheduler validates names
        raise ValueError(kind)
    return prev.astype(sample.dtype), carry


# ----------------------------------------------------------------------------------------------
# Training: the DDPM forward process and the v-prediction target.
# ----------------------------------------------------------------------------------------------


def _per_sample(values: Array, t: Array, like: Array) -> Array:
    """values[t] shaped to broadcast over `like`'s non-batch axes."""
    v = jnp.asarray(values, like.dtype)[jnp.asarray(t)]
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(alphas_cumprod: Array, x0: Array, noise: Array, t: Array) -> Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with `t` one timestep per batch entry."""
    ac = _per_sample(alphas_cumprod, t, x0)
    return ac**0.5 * x0 + (1 - ac) ** 0.5 * noise


def velocity(alphas_cumprod: Array, x0: Array, noise: Array, t: Array) -> Array:
    """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    ac = _per_sample(alphas_cumprod, t, x0)
    return ac**0.5 * noise - (1 - ac) ** 0.5 * x0
