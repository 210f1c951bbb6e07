"""ITK's failures as one line: its reason without the source location, its C chatter kept quiet.

SimpleITK raises ``RuntimeError("Exception thrown in ...: /path/itkFoo.cxx:123:\\nITK ERROR:
NrrdImageIO(0x55...): the reason...")``; the user needs only the reason. The libraries under ITK
(HDF5, MetaIO, NIfTI) also print diagnostics straight to file descriptor 2 -- a truncated ``.h5``
gives 25 HDF5 lines -- which Python's ``sys.stderr`` cannot intercept. :func:`native_stderr_captured`
sends fd 2 to a temporary file around a read; :func:`itk_reason` picks the reason from the
exception, or from those diagnostics when the exception only says that reading failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from diffusionreg.errors import InputError

_Result = TypeVar("_Result")
_FD2_LOCK = threading.RLock()

# What comes before ITK's reason: SimpleITK's "Exception thrown in ...:", the source location
# "/path/itkNrrdImageIO.cxx:935:", "ITK ERROR:" / "sitk::ERROR:" and the object "NrrdImageIO(0x55...):".
_REASON_PREFIXES = (
    re.compile(r"^Exception thrown in SimpleITK \w+:\s*"),
    re.compile(r"^.*?\.(?:cxx|hxx|cpp|txx|h):\d+:\s*"),
    re.compile(r"^(?:ITK ERROR:|itk::ERROR:|sitk::ERROR:)\s*"),
    re.compile(r"^\w+(?:<[^>]*>)?\(0x[0-9a-fA-F]+\):\s*"),
)
# NRRD's reason repeats the file name before teem's: "ReadImageInformation: Error reading x.nrrd: ".
_NRRD_READING = re.compile(r"^\w+: Error reading .*?: (?=\S)")
# teem's (NRRD) stack lines: "[nrrd] _nrrdEncodingRaw_read: fread got only ...".
_TEEM_PREFIX = re.compile(r"^\[\w+\] \w+: ")
# One frame of an HDF5 error stack: "#007: .../H5Fsuper.c line 614 in itk_H5F__super_read(): reason".
_HDF5_FRAME = re.compile(r"#\d+: .* in [\w.]+\(\): (.*)$")
_HDF5_TRUNCATED = re.compile(r"truncated file: eof = (\d+),.*stored_eof = (\d+)")
_METAIO_SHORT = re.compile(r"data not read completely\s+ideal = (\d+) : actual = (\d+)")


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Capture what C code prints on fd 2 inside the block; the list gets the text at the end."""
    captured: list[str] = []
    sys.stderr.flush()
    # fd 2 belongs to the whole process: threads reading at once take turns.
    with _FD2_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 (e.g. a GUI process without a console): nothing to silence
            yield captured
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                captured.append(sink.read().decode("utf-8", errors="replace"))


def call_itk(failure: str, function: Callable[..., _Result], *args) -> _Result:
    """``function(*args)`` with fd 2 captured; a RuntimeError becomes ``InputError("failure: reason")``."""
    with native_stderr_captured() as diagnostics:
        try:
            return function(*args)
        except RuntimeError as caught:
            error = caught
    raise InputError(f"{failure}: {itk_reason(error, ''.join(diagnostics))}") from None


def shorter_than_header(found: int, expected: int) -> str:
    """The one wording for a truncated file, whichever reader noticed it."""
    return f"file is shorter than its header says ({found} of {expected} bytes)"


def itk_reason(error: BaseException, diagnostics: str = "") -> str:
    """The reason of a SimpleITK exception on one line (diagnostics: captured fd-2 text)."""
    for pattern in (_HDF5_TRUNCATED, _METAIO_SHORT):
        match = pattern.search(diagnostics)
        if match:
            found, expected = (int(v) for v in match.groups())
            if pattern is _METAIO_SHORT:
                expected, found = found, expected
            return shorter_than_header(found, expected)
    text = str(error).strip()
    for prefix in _REASON_PREFIXES:
        text = prefix.sub("", text, count=1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    reason = lines[0]
    details = [line for line in lines[1:] if not line.startswith(("Tried to create", "You probably"))]
    if reason.endswith(":") and details:  # e.g. NRRD: "Read: Error reading x:" then teem's stack
        reason = _NRRD_READING.sub("", f"{reason} {_TEEM_PREFIX.sub('', details[-1])}")
    frames = [m.group(1) for m in map(_HDF5_FRAME.search, diagnostics.splitlines()) if m]
    if frames:
        reason = f"{reason} (HDF5: {frames[-1]})"
    return " ".join(reason.split())
