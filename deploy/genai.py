"""An export in OpenVINO GenAI's Text2ImagePipeline (its C++ sampler loop), with one of our
sampler names: what the GenAI tests and ``benchmarks/genai_runtime.py`` compare ours with.

GenAI builds PNDM from ``scheduler/scheduler_config.json``'s class; DDIM and Euler are set
from the same config. Euler's config gets diffusers' default spacing written out, because
GenAI reads a missing ``timestep_spacing`` as ``leading`` where diffusers means ``linspace``.
GenAI has no DPM-Solver++.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dq_export.errors import UserError

GENAI_SCHEDULERS = {"pndm": None, "ddim": "DDIM", "euler": "EULER_DISCRETE"}  # None: as saved


def genai_pipeline(export: str | Path, scheduler: str = "pndm", device: str | None = "CPU"):
    """``openvino_genai.Text2ImagePipeline`` on ``export`` with ``scheduler``, compiled with
    dynamic shapes for ``device``; with ``device=None`` uncompiled, for ``reshape`` to static
    shapes and ``compile``."""
    import openvino_genai as og

    if scheduler not in GENAI_SCHEDULERS:
        raise UserError(f"OpenVINO GenAI has no {scheduler!r} sampler here: use one of "
                        f"{', '.join(GENAI_SCHEDULERS)}")
    export = Path(export)
    pipe = og.Text2ImagePipeline(str(export), device) if device else \
        og.Text2ImagePipeline(str(export))
    if GENAI_SCHEDULERS[scheduler]:
        config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
        if scheduler == "euler":
            config.setdefault("timestep_spacing", "linspace")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "scheduler_config.json"
            path.write_text(json.dumps(config))
            kind = getattr(og.Scheduler.Type, GENAI_SCHEDULERS[scheduler])
            pipe.set_scheduler(og.Scheduler.from_config(str(path), kind))
    return pipe
