"""The four samplers, in numpy: the same timesteps and updates as diffusers' schedulers.

Deployment needs only OpenVINO and numpy: importing torch and diffusers for the sampler
arithmetic cost a deployed process about 300 MB of memory. Each class reads an export's
scheduler config the way diffusers' ``from_config`` does (its own defaults, then the keys it
knows), and ``tests/test_schedulers.py`` checks every trajectory against diffusers'.
Configs that ask for a feature implemented only in diffusers get a one-line error.

Interface (what ``deploy.sampler.denoise`` calls): ``set_timesteps(n)``, ``timesteps``,
``init_noise_sigma``, ``scale_model_input(x, t)`` and ``step(model_output, t, x, eta,
generator) -> x_prev``, on float32 arrays; steps are taken in the order of ``timesteps``.
"""

from __future__ import annotations

import math

import numpy as np

from dq_export.errors import UserError

PREDICTIONS = ("epsilon", "v_prediction")
# diffusers features these samplers do not implement, with the values that leave them off
# (DDPM's fixed variances are its own ancestral sampler's: DDIM, PNDM, DPM-Solver and Euler
# ignore them, as diffusers' do; a learned variance would mean twice the output channels)
NOT_IMPLEMENTED = {"thresholding": (False,), "rescale_betas_zero_snr": (False,),
                   "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
                   "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
                   "use_flow_sigmas": (False,),
                   "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large",
                                     "fixed_large_log"),
                   "timestep_type": ("discrete",), "interpolation_type": ("linear",),
                   "lambda_min_clipped": (-math.inf,), "euler_at_final": (False,)}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
            "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
            "steps_offset": 0}


def alphas_cumprod(config: dict) -> np.ndarray:
    """The training noise schedule, alpha-bar_t for t = 0..T-1, in float32 as diffusers."""
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["trained_betas"] is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    elif config["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
    elif config["beta_schedule"] == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
                          for i in range(n)], dtype=np.float32)
    else:
        raise UserError(f"beta_schedule {config['beta_schedule']!r} is not supported: use "
                        "linear, scaled_linear or squaredcos_cap_v2")
    return np.cumprod(1 - betas, dtype=np.float32)


def spaced(n: int, steps: int, spacing: str, offset: int, points: int | None = None):
    """``points`` (default ``steps``) training timesteps, ascending, as diffusers spaces them:
    linspace over [0, n-1], leading (multiples of n // points, plus the offset) or trailing
    (counted down from n). Floats: each scheduler rounds or casts as its diffusers twin."""
    points = points or steps
    if spacing == "linspace":
        return np.linspace(0, n - 1, points)
    if spacing == "leading":
        return (np.arange(points) * (n // points)).round() + offset
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps))[::-1] - 1
    raise UserError(f"timestep_spacing {spacing!r} is not supported: use linspace, leading "
                    "or trailing")


class Sampler:
    DEFAULTS: dict = {}
    init_noise_sigma = 1.0

    def __init__(self, config: dict, overrides: dict):
        own = {**SCHEDULE, **self.DEFAULTS}
        self.config = {**own, **{k: v for k, v in config.items() if k in own}, **overrides}
        for key, off in NOT_IMPLEMENTED.items():
            if config.get(key, off[0]) not in off:
                raise UserError(f"the scheduler config sets {key}={config[key]!r}, which "
                                "dq-export's samplers do not implement: remove it from the "
                                "export's scheduler config")
        if self.config["prediction_type"] not in PREDICTIONS:
            raise UserError(f"prediction_type {self.config['prediction_type']!r} is not "
                            f"supported: use one of {', '.join(PREDICTIONS)}")
        self.n_train = self.config["num_train_timesteps"]
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.timesteps = np.zeros(0)
        self.steps = 0

    @property
    def v_prediction(self) -> bool:
        return self.config["prediction_type"] == "v_prediction"

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        return sample

    def _alpha_bar(self, timestep: int):
        """alpha-bar_t; before t = 0 (the last step's target) 1 with ``set_alpha_to_one``,
        else alpha-bar_0: PNDM's and DDIM's final alpha."""
        if timestep >= 0:
            return self.alphas_cumprod[timestep]
        return np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _spaced(self, steps: int, points: int | None = None) -> np.ndarray:
        return spaced(self.n_train, steps, self.config["timestep_spacing"],
                      self.config["steps_offset"], points)


class PNDM(Sampler):
    """PLMS, Stable Diffusion's default: PNDM with ``skip_prk_steps`` (linear multistep from
    the first step, the first timestep taken twice)."""

    DEFAULTS = {"set_alpha_to_one": False, "timestep_spacing": "leading", "skip_prk_steps": True}

    def __init__(self, config: dict, overrides: dict):
        super().__init__(config, overrides)
        if not self.config["skip_prk_steps"]:
            raise UserError("PNDM's Runge-Kutta warm-up (skip_prk_steps=False) is not "
                            "implemented: use skip_prk_steps (PLMS)")

    def set_timesteps(self, steps: int) -> None:
        base = self._spaced(steps).round().astype(np.int64)
        self.timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        self.steps, self.ets, self.counter, self.cur_sample = steps, [], 0, None

    def step(self, model_output, timestep, sample, eta=0.0, generator=None) -> np.ndarray:
        timestep = int(timestep)
        prev_timestep = timestep - self.n_train // self.steps
        if self.counter != 1:
            self.ets = [*self.ets[-3:], model_output]
        else:  # the repeated first timestep: a second-order start (diffusers' PLMS warm-up)
            prev_timestep, timestep = timestep, timestep + self.n_train // self.steps
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        return self._prev_sample(sample, timestep, prev_timestep, model_output)

    def _prev_sample(self, sample, timestep, prev_timestep, model_output):
        """PNDM paper eq. 9: x_{t-d} from x_t and the combined noise prediction."""
        a_t, a_prev = self.alphas_cumprod[timestep], self._alpha_bar(prev_timestep)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.v_prediction:
            model_output = (a_t**0.5) * model_output + (b_t**0.5) * sample
        denominator = a_t * b_prev ** (0.5) + (a_t * b_t * a_prev) ** (0.5)
        return (a_prev / a_t) ** (0.5) * sample - (a_prev - a_t) * model_output / denominator


class DDIM(Sampler):
    """DDIM (Song et al.); ``eta`` > 0 adds the stochastic term, noise from ``generator``."""

    DEFAULTS = {"set_alpha_to_one": True, "timestep_spacing": "leading", "clip_sample": True,
                "clip_sample_range": 1.0}

    def set_timesteps(self, steps: int) -> None:
        spaced_ = self._spaced(steps)
        if self.config["timestep_spacing"] != "trailing":
            spaced_ = spaced_.round()
        self.timesteps = spaced_[::-1].astype(np.int64).copy()
        self.steps = steps

    def step(self, model_output, timestep, sample, eta=0.0, generator=None) -> np.ndarray:
        timestep = int(timestep)
        prev_timestep = timestep - self.n_train // self.steps
        a_t, a_prev = self.alphas_cumprod[timestep], self._alpha_bar(prev_timestep)
        b_t = 1 - a_t
        if self.v_prediction:
            x0 = (a_t**0.5) * sample - (b_t**0.5) * model_output
            eps = (a_t**0.5) * model_output + (b_t**0.5) * sample
        else:
            x0 = (sample - b_t ** (0.5) * model_output) / a_t ** (0.5)
            eps = model_output
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = eta * variance ** (0.5)
        prev = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
        if eta > 0:
            prev = prev + std * generator.randn(model_output.shape)
        return prev.astype(np.float32)


class _SigmaSampler(Sampler):
    """Samplers parameterised by sigma_t = sqrt((1 - alpha-bar) / alpha-bar), ending at 0."""

    DEFAULTS = {"timestep_spacing": "linspace", "final_sigmas_type": "zero"}

    def _sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        if self.config["final_sigmas_type"] == "sigma_min":
            last = table[0]
        elif self.config["final_sigmas_type"] == "zero":
            last = 0.0
        else:
            raise UserError(f"final_sigmas_type {self.config['final_sigmas_type']!r} is not "
                            "supported: use zero or sigma_min")
        return np.concatenate([sigmas, [last]]).astype(np.float32)


class Euler(_SigmaSampler):
    """Euler's method on the probability-flow ODE (Karras et al.'s Algorithm 2, no churn)."""

    def set_timesteps(self, steps: int) -> None:
        self.timesteps = self._spaced(steps)[::-1].astype(np.float32).copy()
        self.sigmas = self._sigmas_at(self.timesteps)
        self.index = 0
        peak = self.sigmas.max()
        self.init_noise_sigma = (peak if self.config["timestep_spacing"] in ("linspace", "trailing")
                                 else (peak**2 + 1) ** 0.5)

    def scale_model_input(self, sample, timestep) -> np.ndarray:
        return sample / ((self.sigmas[self.index] ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, eta=0.0, generator=None) -> np.ndarray:
        sigma = self.sigmas[self.index]
        if self.v_prediction:
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            x0 = sample - sigma * model_output
        derivative = (sample - x0) / sigma
        self.index += 1
        return (sample + derivative * (self.sigmas[self.index] - sigma)).astype(np.float32)


class DPMSolverPP(_SigmaSampler):
    """DPM-Solver++(2M) (Lu et al.): second-order multistep in log-SNR, first order at the
    first step and the last (diffusers' lower_order_final)."""

    DEFAULTS = {**_SigmaSampler.DEFAULTS, "solver_order": 2, "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint", "lower_order_final": True}

    def __init__(self, config: dict, overrides: dict):
        super().__init__(config, overrides)
        wanted = {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint"}
        for key, value in wanted.items():
            if self.config[key] != value:
                raise UserError(f"DPM-Solver with {key}={self.config[key]!r} is not "
                                f"implemented: dq-export runs {key}={value!r}")

    def set_timesteps(self, steps: int) -> None:
        spaced_ = self._spaced(steps, points=steps + 1)[::-1]  # n + 1 points, the last dropped
        if self.config["timestep_spacing"] != "trailing":  # trailing counts n steps already
            spaced_ = spaced_.round()[:-1]
        self.timesteps = spaced_.astype(np.int64).copy()
        self.sigmas = self._sigmas_at(self.timesteps)
        self.steps, self.index, self.outputs = len(self.timesteps), 0, []

    def _alpha_sigma_lambda(self, index: int):
        sigma = self.sigmas[index]
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        sigma_t = sigma * alpha_t
        with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda = +inf, as in torch
            return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)

    def step(self, model_output, timestep, sample, eta=0.0, generator=None) -> np.ndarray:
        i = self.index
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        if self.v_prediction:
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        else:
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        self.outputs = [*self.outputs[-1:], x0]
        # first order at the first step and at the last (to sigma 0, or in short runs)
        last = i == self.steps - 1 and (self.config["final_sigmas_type"] == "zero" or (
            self.config["lower_order_final"] and self.steps < 15))
        h = lambda_t - lambda_s0
        decay = alpha_t * (np.exp(-h) - 1.0)
        prev = (sigma_t / sigma_s0) * sample - decay * x0
        if i > 0 and not last:  # midpoint second order: D1 = (x0 - x0_prev) / r0
            _, _, lambda_s1 = self._alpha_sigma_lambda(i - 1)
            r0 = (lambda_s0 - lambda_s1) / h
            prev = prev - 0.5 * decay * ((1.0 / r0) * (x0 - self.outputs[0]))
        self.index += 1
        return prev.astype(np.float32)


# name: (class, overrides of the export's config)
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "pndm": (PNDM, {"skip_prk_steps": True}),  # PLMS, Stable Diffusion's default
    "ddim": (DDIM, {}),
    "dpm++": (DPMSolverPP, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (Euler, {}),
}
ALIASES = {"plms": "pndm", "dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpm": "dpm++"}


def scheduler_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, config: dict) -> Sampler:
    cls, overrides = SCHEDULERS[scheduler_name(name)]
    return cls(config, overrides)
