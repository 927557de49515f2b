"""OpenVINO runtime for dq-export folders: ``from deploy import Pipeline``."""

from deploy.pipeline import GenerationResult, Pipeline

__all__ = ["GenerationResult", "Pipeline"]
