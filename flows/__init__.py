"""Prefect flows: compose the Hydra config and wire the stage tasks, nothing else."""
