"""Per-step noise-prediction fidelity of exported UNets against their FP32 export.

FP32 samples; at every step each other export's UNet gets the very same input
(x_t, t, embeddings) and its prediction is compared with FP32's. These are the real OpenVINO
graphs (not a simulation), compared on equal inputs without error feedback from earlier
steps: the per-step distortion the rate-distortion paper plots across timesteps. An export
with a feature cache runs as it samples (its schedule, full or on the cached feature), the
feature coming from its own full calls on FP32's trajectory.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dq_export.errors import UserError


def relative_mse(reference: np.ndarray, output: np.ndarray) -> float:
    """||O - O^||^2 / ||O||^2."""
    return float(np.sum((output - reference) ** 2) / np.sum(reference ** 2))


def relative_error(reference: np.ndarray, output: np.ndarray) -> float:
    """||O - O^|| / ||O||: the square root of ``relative_mse``."""
    return relative_mse(reference, output) ** 0.5


def global_ssim(reference: np.ndarray, output: np.ndarray) -> float:
    """SSIM with one window over the whole tensor (the statistics in the rate-distortion
    paper's eq. 3); constants (0.01 L)^2 and (0.03 L)^2 with L the reference's range."""
    x, y = reference.astype(np.float64).ravel(), output.astype(np.float64).ravel()
    span = float(x.max() - x.min()) or 1.0
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    mx, my = x.mean(), y.mean()
    cov = np.mean((x - mx) * (y - my))
    return float((2 * mx * my + c1) * (2 * cov + c2)
                 / ((mx ** 2 + my ** 2 + c1) * (x.var() + y.var() + c2)))


def distortion(reference: np.ndarray, output: np.ndarray) -> float:
    """The rate-distortion paper's output distortion: relative MSE plus the SSIM loss.

    Eq. 3 as printed divides the squared error by ||O||^2 ||O^||^2 and adds SSIM itself;
    we read it as the text describes it (an MSE plus an SSIM *loss*, zero when identical):
    ||O - O^||^2 / ||O||^2 + (1 - SSIM(O, O^)).
    Noise predictions have zero mean, so SSIM's mean term makes the distortion far more
    sensitive to a bias (the whole image drifting) than to noise of the same energy.
    """
    return relative_mse(reference, output) + 1.0 - global_ssim(reference, output)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "relative_error": relative_error, "relative_mse": relative_mse, "distortion": distortion}


def trajectory_errors(reference, others: dict, prompts: list[str], steps: int,
                      scheduler: str, seed: int, guidance: float = 7.5,
                      metrics: dict = METRICS) -> dict[str, dict[str, np.ndarray]]:
    """{label: {metric: [prompts, steps] array}} of every pipeline in ``others`` against
    ``reference`` (deploy.Pipeline objects, all compiled for the same batch size B).

    Prompts are sampled B at a time, batch k from ``seed + k`` (with B = 1, prompt i from
    seed + i); a prompt's UNet output is its unconditional and conditional rows together.
    """
    from tqdm.auto import tqdm

    from deploy.sampler import run_sampler

    batch = reference.batch_size
    if any(pipe.batch_size != batch for pipe in others.values()) or len(prompts) % batch:
        raise UserError(f"{len(prompts)} prompts and pipelines compiled for batches of "
                        f"{sorted({batch, *(p.batch_size for p in others.values())})}: "
                        "compile every pipeline for one batch size that divides the prompts")
    rows = {label: {m: [] for m in metrics} for label in others}
    for k in tqdm(range(len(prompts) // batch), desc="fidelity", unit="batch", leave=False):
        chunk = prompts[k * batch:(k + 1) * batch]
        calls = {label: {m: [] for m in metrics} for label in others}
        unets = {label: pipe.denoiser(scheduler, steps) for label, pipe in others.items()}

        def unet(sample, timestep, embeddings):
            eps = reference.predict_noise(sample, timestep, embeddings)
            for label in others:
                eps_q = unets[label](sample, timestep, embeddings)
                for name, metric in metrics.items():
                    calls[label][name].append([metric(eps[i::batch], eps_q[i::batch])
                                               for i in range(batch)])
            return eps

        embeddings = np.concatenate([reference.encode_prompts([""] * batch),
                                     reference.encode_prompts(chunk)])
        run_sampler(unet, embeddings, scheduler, reference.manifest["scheduler"], steps,
                    reference.latent_shape, seed + k, guidance)
        for label in others:
            for name in metrics:  # [steps, batch] -> batch rows of steps
                rows[label][name] += np.asarray(calls[label][name]).T.tolist()
    return {label: {name: np.asarray(r) for name, r in per.items()}
            for label, per in rows.items()}
