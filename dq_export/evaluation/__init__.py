"""Evaluation of exports: per-step fidelity, image metrics, and the reference model's judge."""
