"""Which torch devices the worker can use, found by a probe run in a subprocess.

The GUI process never imports torch: :data:`PROBE_SCRIPT` runs in ``PythonSlicer -c`` and
prints one JSON object (torch version, CUDA build and availability, GPU names and memory,
Apple MPS). :func:`parseProbeOutput` reads it back; :func:`deviceChoices` turns it into the
entries of a device selector, and :func:`deviceWarnings` into advice for the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

#: Marker that prefixes the probe's JSON line (other output, e.g. warnings, is ignored).
PROBE_MARKER = "DIFFUSIONREG_DEVICES "

#: Run with ``python -c``; prints ``PROBE_MARKER + json`` and always exits 0.
PROBE_SCRIPT = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": None,
        "cuda_built": False, "cuda_available": False, "cuda_version": None, "cudnn": None,
        "devices": [], "mps": False, "error": None}
try:
    import importlib.metadata as md
    try:
        info["torch_distribution"] = md.version("torch")
    except md.PackageNotFoundError:
        info["torch_distribution"] = None
    if info["torch_distribution"] is not None:
        import torch
        info["torch"] = torch.__version__
        info["cuda_built"] = bool(torch.backends.cuda.is_built())
        info["cuda_version"] = torch.version.cuda
        info["cuda_available"] = bool(info["cuda_built"] and torch.cuda.is_available())
        if info["cuda_available"]:
            try:
                info["cudnn"] = torch.backends.cudnn.version()
            except Exception:
                pass
            for index in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(index)
                info["devices"].append({"index": index, "name": p.name,
                                        "total_memory_gb": round(p.total_memory / 2**30, 2),
                                        "capability": "%d.%d" % (p.major, p.minor)})
        mps = getattr(torch.backends, "mps", None)
        info["mps"] = bool(mps is not None and mps.is_available())
except Exception as error:
    info["error"] = "%s: %s" % (type(error).__name__, error)
print("DIFFUSIONREG_DEVICES " + json.dumps(info), flush=True)
"""

#: GPUs with less memory than this get a warning (GB).
LOW_GPU_MEMORY_GB = 6.0


@dataclass
class GpuInfo:
    index: int
    name: str
    totalMemoryGB: float
    capability: str = ""


@dataclass
class DeviceInfo:
    """What the probe found; ``torch`` is None when torch is not installed."""

    torch: str | None = None
    cudaBuilt: bool = False
    cudaAvailable: bool = False
    cudaVersion: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    mps: bool = False
    python: str = ""
    platform: str = ""
    error: str | None = None

    @property
    def torchInstalled(self) -> bool:
        return self.torch is not None

    def summary(self) -> str:
        """One or two lines for a label."""
        if self.error and not self.torch:
            return f"PyTorch could not be checked: {self.error}"
        if not self.torch:
            return "PyTorch is not installed (it is installed on first use)."
        cuda = f"CUDA {self.cudaVersion}" if self.cudaBuilt else "CPU-only build"
        lines = [f"PyTorch {self.torch} ({cuda})"]
        if self.gpus:
            lines += [f"GPU {g.index}: {g.name}, {g.totalMemoryGB:.1f} GB" for g in self.gpus]
        elif self.mps:
            lines.append("Apple GPU (MPS) available")
        else:
            lines.append("no usable GPU: registration runs on the CPU")
        return "\n".join(lines)


def probeCommand(python: str) -> list[str]:
    """The command that runs the probe with ``python`` (``PythonSlicer`` in Slicer)."""
    return [str(python), "-c", PROBE_SCRIPT]


def parseProbeOutput(text: str) -> DeviceInfo:
    """Read the probe's output (stdout, possibly with other lines around the JSON line)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith(PROBE_MARKER):
            try:
                record = json.loads(line[len(PROBE_MARKER) :])
            except ValueError as error:
                return DeviceInfo(error=f"unreadable probe output: {error}")
            return deviceInfoFromRecord(record)
    last = text.strip().splitlines()[-1] if text.strip() else "no output"
    return DeviceInfo(error=f"the device probe did not report ({last})")


def deviceInfoFromRecord(record: dict) -> DeviceInfo:
    gpus = [
        GpuInfo(
            int(d.get("index", n)), str(d.get("name", "GPU")), float(d.get("total_memory_gb", 0.0)), str(d.get("capability", ""))
        )
        for n, d in enumerate(record.get("devices") or [])
    ]
    return DeviceInfo(
        torch=record.get("torch"),
        cudaBuilt=bool(record.get("cuda_built")),
        cudaAvailable=bool(record.get("cuda_available")),
        cudaVersion=record.get("cuda_version"),
        gpus=gpus,
        mps=bool(record.get("mps")),
        python=str(record.get("python", "")),
        platform=str(record.get("platform", "")),
        error=record.get("error"),
    )


def deviceChoices(info: DeviceInfo | None) -> list[tuple[str, str]]:
    """``(label, value)`` entries for a device selector; values are ``--device`` arguments."""
    choices = [("Auto (GPU if available)", "auto"), ("CPU", "cpu")]
    if info is None:
        return choices
    for gpu in info.gpus:
        choices.append((f"cuda:{gpu.index} - {gpu.name}, {gpu.totalMemoryGB:.0f} GB", f"cuda:{gpu.index}"))
    if info.mps and not info.gpus:
        choices.append(("Apple GPU (MPS)", "mps"))
    return choices


def deviceWarnings(info: DeviceInfo | None, device: str = "auto") -> list[str]:
    """Advice for the chosen device: no GPU, low GPU memory, CUDA build without a driver."""
    if info is None or not info.torch:
        return []
    warnings: list[str] = []
    if info.cudaBuilt and not info.cudaAvailable and not info.mps:
        warnings.append(
            "PyTorch was built with CUDA but no usable GPU was found (driver missing or too old); "
            "registration runs on the CPU. The PyTorch Utils module can reinstall a matching build."
        )
    elif not info.gpus and not info.mps and device in ("auto", "cpu"):
        warnings.append("No GPU found: registration runs on the CPU; fewer diffusion steps make it faster.")
    if device.startswith("cuda") and not info.cudaAvailable:
        warnings.append(f"{device} was chosen but CUDA is not available; choose CPU or Auto.")
    chosen = info.gpus
    if device.startswith("cuda:"):
        chosen = [g for g in info.gpus if f"cuda:{g.index}" == device]
    for gpu in chosen[:1] if device in ("auto", "cuda") else chosen:
        if gpu.totalMemoryGB and gpu.totalMemoryGB < LOW_GPU_MEMORY_GB:
            warnings.append(
                f"{gpu.name} has {gpu.totalMemoryGB:.1f} GB: large volumes may run out of GPU memory; if they do, choose CPU."
            )
    return warnings
