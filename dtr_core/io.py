"""Atomic, verifiable file writes: a reader never sees a half-written file as complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class IntegrityError(RuntimeError):
    """A stored file does not match the digest its manifest recorded."""


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp make owner-only files and folders; published ones get the mode any other would
# (0o666 / 0o777 less the umask), so a cache shared by several users stays readable to them.
# The umask is read once, at import.
_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def staging_dir(beside: Path, prefix: str, suffix: str = "") -> Path:
    """A new empty folder in ``beside`` (to be renamed into place later), with the usual mode.

    Its name says which process on which host owns it (``<prefix><host>+<pid>+<random><suffix>``),
    so that the folders of killed processes can be told from those of live ones: each call first
    removes the dead ones of this host (``remove_dead_staging``)."""
    remove_dead_staging(beside, prefix, suffix)
    owner = f"{socket.gethostname()}+{os.getpid()}+"
    folder = Path(tempfile.mkdtemp(dir=beside, prefix=prefix + owner, suffix=suffix))
    folder.chmod(DIR_MODE)
    return folder


def remove_dead_staging(beside: Path, prefix: str, suffix: str = "") -> None:
    """Delete the staging folders in ``beside`` that processes of this host which no longer run
    left there (a run killed while exporting). A live process's folder, another host's (on a shared
    filesystem: its pids mean nothing here) and names not made by ``staging_dir`` are left alone."""
    host = socket.gethostname()
    for entry in os.scandir(beside):
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix) and entry.is_dir(follow_symlinks=False)):
            continue
        owner_host, _, rest = name[len(prefix):].partition("+")
        pid, separator, _ = rest.partition("+")
        if separator and owner_host == host and pid.isdigit() and not is_running(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)  # another run may be removing it too


def is_running(pid: int) -> bool:
    """Whether process ``pid`` of this machine is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    # The mode is set on what was written (some writers replace the temporary file with their own).
    os.chmod(tmp, FILE_MODE)
    # rename is atomic on POSIX within one filesystem, so the final name appears only complete.
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(text)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def link_tree(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """``destination`` becomes a copy of the flat folder ``source`` whose files are hard links (no
    extra space; copied where the two lie on different filesystems), replacing what was there."""
    source, destination = Path(source), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the destination so that it appears whole or not at all.
    staging = staging_dir(destination.parent, prefix=f".{destination.name}.tmp-")
    try:
        for file in source.iterdir():
            try:
                os.link(file, staging / file.name)
            except OSError:
                shutil.copy2(file, staging / file.name)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def point_symlink(link: str | os.PathLike, target: str | os.PathLike) -> Path:
    """``link`` becomes a symlink to ``target`` (relative, so the pair can move together), replacing
    the link that was there at once: a reader finds the old target or the new one, never neither."""
    link = Path(link)
    staged = link.parent / f".{link.name}.tmp-{socket.gethostname()}+{os.getpid()}"
    staged.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), staged)
    os.replace(staged, link)
    return link


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Write safetensors atomically; returns the file's sha256."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def load_tensors(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load safetensors, first checking the sha256 when one is given."""
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    return load_file(str(path))


def verify_sha256(path: str | os.PathLike, expected_sha256: str) -> None:
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise IntegrityError(
            f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected_sha256[:12]}…; "
            "the file was changed or truncated — delete it and rerun the stage that wrote it"
        )


def save_torch_state(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """``torch.save`` atomically (tensors and plain Python values only); returns the file's sha256."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def load_torch_state(path: str | os.PathLike, expected_sha256: str) -> dict[str, Any]:
    """Load what ``save_torch_state`` wrote, after checking its sha256; never unpickles code."""
    verify_sha256(path, expected_sha256)
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
