"""Which modalities the panel offers and which model will run, from the installed models.

A panel must offer only what works: a modality appears in the modality selector only when an
**installed** model of the module's task supports it (every modality its registry entry lists;
a model declaring ``any`` adds "Any").
With no model chosen explicitly the backend picks the model itself (``diffusionreg.models.resolve``):
the first registered model of the task that lists that modality, installed ones first, then a
generic one (``any`` its only modality). A conditional model listing ``any`` among others serves
"Any", not every modality: it runs only the classes it was trained for. :func:`defaultModel`
applies the same rule so the panel can say which model will run.
"""

from __future__ import annotations

from collections.abc import Sequence

from .models import ModelEntry
from .paths import backendModule

_vocabulary = backendModule("vocabulary")
ANY = _vocabulary.ANY_MODALITY


def modalityLabel(modality: str) -> str:
    """What the panel shows for a backend modality name (``mri`` -> ``MRI``)."""
    return _vocabulary.MODALITY_LABELS.get(modality, modality)


def installedModalities(entries: Sequence[ModelEntry], task: str) -> list[str]:
    """Modalities (backend names) that some installed model of ``task`` supports, in vocabulary order."""
    found = {m for e in entries if e.task == task and e.available for m in e.served}
    ordered = [m for m in _vocabulary.MODALITIES if m in found]
    return ordered + sorted(found - set(ordered))


def defaultModel(entries: Sequence[ModelEntry], task: str, modality: str) -> ModelEntry | None:
    """The registry model the backend runs for ``modality`` when no model is given (None: none)."""
    registered = [e for e in entries if e.task == task and e.source == "registry"]
    ordered = sorted(registered, key=lambda e: not e.available)  # stable: registry order otherwise
    for entry in ordered:
        if modality in entry.served:
            return entry
    return next((entry for entry in ordered if entry.served == (ANY,)), None)


def modelToRun(entries: Sequence[ModelEntry], task: str, modality: str, model: str = "") -> tuple[ModelEntry | None, str]:
    """``(entry, "")`` for the model a run would use, or ``(None, reason)`` when it cannot run.

    ``model`` is what the panel passes as ``--model`` ("" for the modality's default).
    """
    if model:
        entry = next((e for e in entries if e.modelArgument() == model or e.name == model), None)
        if entry is None:
            return None, f"The model '{model}' is not installed"
        if not entry.serves(modality):
            served = ", ".join(modalityLabel(m) for m in entry.served)
            return None, f"The model '{entry.name}' is for {served}, not {modalityLabel(modality)}"
    else:
        entry = defaultModel(entries, task, modality)
        if entry is None:
            return None, f"No {task} model for {modalityLabel(modality)} is installed"
    if not entry.available:
        if entry.isRemote:
            return None, f"The model '{entry.name}' is not downloaded yet (Download it under Models)"
        return None, f"The model file of '{entry.name}' is missing"
    return entry, ""


def describeModel(entry: ModelEntry) -> str:
    """One line for the panel: which model will run and for what."""
    origin = "imported" if entry.source == "imported" else "registry"
    served = ", ".join(modalityLabel(m) for m in entry.served)
    return f"Runs '{entry.name}' ({entry.task}, {served}; {origin})"
