"""Where files are written: atomically, so an output is complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsegpt.errors import SparseGPTError


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output path that is a file or a non-empty folder (unless overwrite)."""
    if out.exists() and not out.is_dir():
        raise SparseGPTError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SparseGPTError(f"output folder {out} exists and is not empty (use --overwrite to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise SparseGPTError(f"cannot write {out}: folder {parent} does not exist")


def partial_folder(out: Path, kind: str = "partial") -> Path:
    """The fixed sibling folder ``.<out>.sparsegpt-<kind>`` where a long run to ``out`` keeps its work
    until it is done, so the same command can continue it: a streamed prune's blocks ("partial"), a
    sweep's rows ("rows"; a kind of its own, so that neither run ever removes the other's work)."""
    out = out.resolve()
    return out.parent / f".{out.name}.sparsegpt-{kind}"


def write_folder_atomically(out: Path, fill: Callable[[Path], None], overwrite: bool) -> None:
    """Build the folder in a sibling temporary folder with ``fill``, then move it into place."""
    check_output_folder(out, overwrite)
    out = out.resolve()
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fill(build)
        publish_folder(build, out, overwrite)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def publish_folder(build: Path, out: Path, overwrite: bool) -> None:
    """Move a finished folder ``build`` to ``out`` (a sibling), replacing an existing ``out`` only with
    ``overwrite``; the old one is removed after the new one is in place."""
    check_output_folder(out, overwrite)
    out = out.resolve()
    _relax_permissions(build)
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(build, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(build, out)


def _relax_permissions(folder: Path) -> None:
    """Temporary files and folders are created private; give the result the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_json_atomically(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder."""
    path = path.resolve()
    if not path.parent.is_dir():
        raise SparseGPTError(f"cannot write {path}: folder {path.parent} does not exist")
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(handle.name, 0o666 & ~umask)
    os.replace(handle.name, path)
