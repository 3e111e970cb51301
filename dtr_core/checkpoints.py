"""Training checkpoints of the stream trainer: the students' weights, the optimizer, torch's RNG
and the training loop's progress, written so that a kill at any moment leaves a whole checkpoint.

Layout of ``folder``: ``step_<NNNNNNNN>/students.safetensors`` (every student's tensors, keyed
``<student index>.<name>``) and ``step_<NNNNNNNN>/trainer.pt`` (optimizer, RNG, progress), named by
``checkpoint.json`` with both files' sha256 and the configuration digest they belong to.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import load_tensors, load_torch_state, read_json, save_tensors, save_torch_state, write_json

CHECKPOINT_MANIFEST = "checkpoint.json"


def save_checkpoint(folder: Path, digest: str, step: int, students: Sequence[nn.Module],
                    optimizer: torch.optim.Optimizer, progress: dict[str, Any], device: torch.device) -> None:
    """Write step files into their own sub-folder, then the manifest naming it (last, atomically),
    then drop older sub-folders: a kill at any point leaves the previous checkpoint intact.

    ``progress``: the loop's state, plain values and CPU tensors (``torch.load(weights_only=True)``
    must read it back).
    """
    step_dir = folder / f"step_{step:08d}"
    weights = {f"{i}.{name}": t for i, s in enumerate(students) for name, t in s.state_dict().items()}
    weights_sha = save_tensors(step_dir / "students.safetensors", weights)
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    state = {"optimizer": optimizer.state_dict(), "rng": rng, "progress": progress}
    state_sha = save_torch_state(step_dir / "trainer.pt", state)
    write_json(folder / CHECKPOINT_MANIFEST, {"digest": digest, "step": step, "directory": step_dir.name,
                                              "students_sha256": weights_sha, "trainer_sha256": state_sha})
    for old in folder.glob("step_*"):
        if old != step_dir:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, digest: str, students: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
                    device: torch.device) -> dict[str, Any] | None:
    """Restore the students, optimizer and RNG from ``folder``'s checkpoint and return the progress
    saved with them (its tensors on the CPU); None if there is no checkpoint.

    Raises ValueError when the checkpoint belongs to another ``digest``, and
    ``io.IntegrityError`` when a file does not match the manifest's sha256.
    """
    path = folder / CHECKPOINT_MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if manifest["digest"] != digest:
        raise ValueError(f"{path} belongs to another configuration (digest {manifest['digest'][:12]}…, "
                         f"expected {digest[:12]}…); delete the folder")
    step_dir = folder / manifest["directory"]
    weights = load_tensors(step_dir / "students.safetensors", manifest["students_sha256"])
    for i, student in enumerate(students):
        prefix = f"{i}."
        student.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    state = load_torch_state(step_dir / "trainer.pt", manifest["trainer_sha256"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["progress"]
