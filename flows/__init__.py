"""Prefect flows: compose the Hydra config and wire the stage tasks, nothing else."""

import os

# Without PREFECT_API_URL a flow starts Prefect's temporary server and gives it 20 s to answer: too
# little on a loaded 2-core machine, or on first use while it creates its database (a known cause of
# "Timed out while attempting to connect to ephemeral Prefect API server"). Set before prefect is
# imported, which reads its settings then; an explicit value wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# Usage telemetry off unless asked for: Prefect's temporary server sends a heartbeat (offline it logs
# "Failed to send telemetry", once with a "database is locked" traceback); Prefect's client and MLflow
# send usage events. DO_NOT_TRACK is the shared opt-out, which MLflow honours only as "true": its own
# switch is set too.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
