"""Hydra configs of `python -m lightning_offload.train`; installed as `lightning_offload.conf` (see pyproject)."""
