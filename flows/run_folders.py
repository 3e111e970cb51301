"""Run folders that runs started in the same second do not share.

Hydra names a run's folder by the time (conf/config.yaml: ``hydra.run.dir``); two runs started in
the same second shared one (their logs interleaved, their reports overwrote each other). The
``${launch_id:}`` resolver adds this process's id and a random part: unique on one host, and
between hosts sharing the output folder unless 16 random bits collide within the same second. It is
fixed for the process, so a sweep's jobs still share their sweep folder.
"""

from __future__ import annotations

import functools
import os
import secrets


@functools.lru_cache(maxsize=1)
def launch_id() -> str:
    """``<pid>-<4 hex digits>``, the same for every call in this process."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


def register_resolvers() -> None:
    """Make ``${launch_id:}`` resolvable (call before Hydra composes the config)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("launch_id", launch_id, replace=True)
