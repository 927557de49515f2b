"""Sampler names -> diffusers scheduler objects built from the export's scheduler config."""

from __future__ import annotations

import threading

from dq_export.errors import UserError

# name: (diffusers class, overrides of the exported config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, Stable Diffusion's default
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}
_IMPORT_LOCK = threading.Lock()  # diffusers imports lazily: racing first imports fail
ALIASES = {"plms": "pndm", "dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpm": "dpm++"}


def scheduler_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, config: dict):
    cls_name, overrides = SCHEDULERS[scheduler_name(name)]
    with _IMPORT_LOCK:
        import diffusers

        cls = getattr(diffusers, cls_name)
    return cls.from_config({**config, **overrides})
