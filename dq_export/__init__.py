"""dq-export: timestep-aware quantization of diffusion models for OpenVINO on CPUs.

Kept import-light on purpose: the command line imports torch and OpenVINO only inside the
command, so ``dq-export --help`` answers at once.
"""

__version__ = "0.1.0"
