"""Prefect flows: compose the Hydra config and wire the stage tasks, nothing else."""

import os

# Without PREFECT_API_URL a flow starts Prefect's temporary server and gives it 20 s to answer: too
# little on a loaded 2-core machine, or on first use while it creates its database (a known cause of
# "Timed out while attempting to connect to ephemeral Prefect API server"). Set before prefect is
# imported, which reads its settings then; an explicit value wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
