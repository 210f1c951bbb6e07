"""Getting registry weights into the user cache: resumable HTTP download and offline import.

Both end the same way: the bytes are written under a temporary name beside the target, their
sha256 is checked against the registry entry, and only then renamed to the target, so the cache
only ever holds verified weights. A download is written to ``<target>.part``; an interrupted one
(network error, Ctrl-C, Cancel) keeps it, and the next pull resumes it with an HTTP ``Range``
request (a server that ignores the range sends the whole file, which then replaces the part).
A part whose checksum is wrong once complete is removed, so a retry starts afresh.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from diffusionreg import __version__
from diffusionreg.errors import InputError
from diffusionreg.registry import RegistryEntry, sha256_file

MIB = 1 << 20
CHUNK_BYTES = MIB  # read size, and the unit of the progress bar
TIMEOUT_S = 60.0  # per socket operation; a stalled server fails instead of hanging
PART_SUFFIX = ".part"


def part_path(target: Path) -> Path:
    return target.with_name(target.name + PART_SUFFIX)


def pull(entry: RegistryEntry, progress=None, timeout: float = TIMEOUT_S) -> Path:
    """Download ``entry.url`` to ``entry.file`` (resuming a part), verify its sha256, return the path."""
    if entry.url is None:
        raise InputError(f"model {entry.name} ({entry.task}) has no download url in the registry")
    if entry.sha256 is None:
        raise InputError(f"model {entry.name} ({entry.task}) has no sha256 in the registry: refusing to download it")
    target = entry.file
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(target)
    _fetch(entry.url, part, entry.size, progress, timeout)
    _verify_then_rename(part, target, entry, remove_on_mismatch=True)
    return target


def import_file(entry: RegistryEntry, source: Path) -> Path:
    """Copy a local weights file for ``entry`` (e.g. downloaded on another machine) into the user
    cache, verified against the registry's sha256 first; ``source`` is never modified."""
    if entry.sha256 is None or entry.cache_file is None:
        raise InputError(f"model {entry.name} ({entry.task}) has no registry checksum to verify {source} against")
    got = sha256_file(source)
    if got != entry.sha256:
        raise InputError(
            f"{source}: sha256 {got[:12]}... is not that of model {entry.name} ({entry.task}), {entry.sha256[:12]}..."
        )
    target = entry.cache_file
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        _verify_then_rename(Path(temporary), target, entry, remove_on_mismatch=True)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _verify_then_rename(temporary: Path, target: Path, entry: RegistryEntry, remove_on_mismatch: bool) -> None:
    got = sha256_file(temporary)
    if got != entry.sha256:
        if remove_on_mismatch:
            temporary.unlink(missing_ok=True)
        raise InputError(
            f"model {entry.name} ({entry.task}): checksum mismatch, expected sha256 "
            f"{entry.sha256[:12]}..., got {got[:12]}...; the file was refused"
        )
    os.replace(temporary, target)


def _fetch(url: str, part: Path, size: int | None, progress, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (start it when absent)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"diffusionreg/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have and (size is None or have == size):
            return  # the part is already complete: the checksum decides
        raise InputError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise InputError(f"cannot download {url}: {reason}") from None
    with response:
        resumed = have > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise InputError(
                f"cannot resume {url}: the server sent another range "
                f"({response.headers.get('Content-Range')!r}); delete {part} to start afresh"
            )
        if not resumed:
            have = 0  # a full answer (200): start the part again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        bar = progress.stage("download", total=_units(total)) if progress is not None else contextlib.nullcontext()
        with bar as stage, open(part, "ab" if resumed else "wb") as stream:
            if stage is not None and have:
                stage.update(have // CHUNK_BYTES, message=f"resuming at {have / MIB:.1f} MiB")
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as error:  # reset, timeout, cut short
                    raise InputError(f"download of {url} interrupted ({error}); run the same command again to resume") from None
                if not chunk:
                    break
                stream.write(chunk)
                have += len(chunk)
                if stage is not None:
                    stage.update(1, message=f"{have / MIB:.1f} of {(total or 0) / MIB:.1f} MiB")
    if total is not None and have != total:
        raise InputError(f"download of {url} stopped at {have} of {total} bytes; run the same command again to resume")


def _units(total: int | None) -> int | None:
    return None if total is None else max(1, -(-total // CHUNK_BYTES))
