"""Timestep-aware calibration: trajectory inputs, per-step statistics, groups, fitted scales."""
