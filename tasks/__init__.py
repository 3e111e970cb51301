"""Prefect tasks wrapping dtr_core's stages: explicit content-keyed caching and MLflow logging live here."""
