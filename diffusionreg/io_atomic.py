"""Write outputs under a temporary name and rename them, so nothing is ever half-written."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# Multi-part suffixes that readers recognise by their full extension.
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def split_suffix(path: Path) -> tuple[str, str]:
    """Split a file name into (stem, extension), keeping ``.nii.gz`` whole."""
    name = path.name
    for suffix in _COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return path.stem, path.suffix


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same extension; rename it on success.

    The temporary file keeps the extension because writers (SimpleITK, h5py) choose the
    format from it. On any exception the temporary file is removed and ``path`` is untouched.
    A command with several outputs uses :class:`diffusionreg.outputs.OutputSet` instead, which
    commits them all together.
    """
    final = Path(path)
    if not final.parent.is_dir():  # one rule for every output: the folder must already exist
        raise FileNotFoundError(f"folder {final.parent} does not exist (for {final.name})")
    stem, suffix = split_suffix(final)
    temporary = final.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield temporary
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()
