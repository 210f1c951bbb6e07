"""CLI: ``diffusionreg models list | pull NAME | import FILE | verify [NAME]``.

Models too large for the repository are registry entries with a ``url``; ``pull`` downloads them
into the per-user cache (resumable, sha256-verified before they are kept), ``import`` copies a
weights file obtained elsewhere (an offline machine) into the same place after the same check,
and ``verify`` re-checks what is installed. Where the cache is: :mod:`diffusionreg.registry`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusionreg import registry
from diffusionreg.errors import InputError
from diffusionreg.vocabulary import EXIT_OK, TASKS


def add_commands(commands, train_commands, common) -> None:
    """Register ``diffusionreg models`` and its sub-commands."""
    cache_note = f"Downloads and imports go to {registry.cache_dir()} (set ${registry.MODELS_DIR_ENV} to use another folder)."
    models = commands.add_parser(
        "models", help="list, download, import and verify registered models", parents=[common], description=cache_note
    )
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", parser_class=type(models))
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="registered models: installed, downloadable or missing")
    p.add_argument("--task", choices=TASKS, help="only models of this task")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    p.set_defaults(handler=_run_list)

    p = sub.add_parser(
        "pull",
        parents=[common],
        help="download a registered model into the user cache",
        description="Download NAME's weights (resuming an interrupted download), check their "
        "sha256 against the registry and keep them only if it matches. " + cache_note,
    )
    p.add_argument("name", help="registered model name")
    p.add_argument("--task", choices=TASKS, help="only this task's entry (default: every entry of NAME)")
    p.set_defaults(handler=_run_pull)

    p = sub.add_parser(
        "import",
        parents=[common],
        help="add a weights file obtained elsewhere (offline)",
        description="Copy FILE into the user cache as the weights of the registry entry whose "
        "sha256 it has; a file that matches no entry is refused. " + cache_note,
    )
    p.add_argument("file", type=Path, help="weights file (.safetensors, .pt, .pth)")
    p.add_argument("--name", help="the registry entry it is for (default: found by its sha256)")
    p.add_argument("--task", choices=TASKS, help="the entry's task (default: any)")
    p.set_defaults(handler=_run_import)

    p = sub.add_parser("verify", parents=[common], help="check the sha256 of installed models")
    p.add_argument("name", nargs="?", help="only this model (default: every installed model)")
    p.set_defaults(handler=_run_verify)


def _entries(task: str | None = None) -> list[registry.RegistryEntry]:
    try:
        return registry.read_entries(task=task)
    except registry.RegistryError as error:
        raise InputError(str(error)) from None


def _named(name: str, task: str | None) -> list[registry.RegistryEntry]:
    found = [e for e in _entries(task) if e.name == name]
    if not found:
        known = sorted({e.name for e in _entries(task)})
        raise InputError(f"unknown model {name!r}{f' for {task}' if task else ''}; registered: {', '.join(known) or 'none'}")
    return found


def _size(entry: registry.RegistryEntry) -> str:
    size = entry.file.stat().st_size if entry.installed else entry.size
    return f"{size / 2**20:.1f} MiB" if size else "?"


def describe(entry: registry.RegistryEntry) -> dict:
    """What ``models list --json`` prints for one entry (the Slicer panel reads the same fields)."""
    return {
        "name": entry.name,
        "task": entry.task,
        "modality": entry.modality,
        "modalities": list(entry.served),
        "state": entry.state,
        "file": str(entry.file),
        "url": entry.url,
        "size": entry.size,
        "sha256": entry.sha256,
    }


def _run_list(args: argparse.Namespace, progress) -> int:
    entries = _entries(args.task)
    if args.json:
        for entry in entries:
            progress.log(json.dumps(describe(entry)))
        return EXIT_OK
    rows = [("name", "task", "modality", "state", "size", "where")]
    rows += [
        (e.name, e.task, e.modality, e.state, _size(e), str(e.file) if e.installed else (e.url or str(e.file))) for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        progress.log("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return EXIT_OK


def _run_pull(args: argparse.Namespace, progress) -> int:
    from .model_download import pull

    for entry in _named(args.name, args.task):
        if entry.installed and registry.sha256_file(entry.file) == entry.sha256:
            progress.log(f"{entry.name} ({entry.task}): already installed at {entry.file}")
            continue
        if entry.url is None:
            raise InputError(
                f"model {entry.name} ({entry.task}) has no download url and its file "
                f"{entry.file} is missing or does not match its sha256"
            )
        path = pull(entry, progress)
        progress.log(f"{entry.name} ({entry.task}): downloaded and verified, {path}")
    return EXIT_OK


def _run_import(args: argparse.Namespace, progress) -> int:
    from .model_download import import_file

    source = args.file
    if not source.is_file():
        raise InputError(f"model file not found: {source}")
    if not source.name.lower().endswith(registry.WEIGHT_SUFFIXES):
        raise InputError(f"model file {source} must be {', '.join(registry.WEIGHT_SUFFIXES)}")
    candidates = _named(args.name, args.task) if args.name else _entries(args.task)
    digest = registry.sha256_file(source)
    matching = [e for e in candidates if e.sha256 == digest]
    if not matching:
        raise InputError(
            f"{source} (sha256 {digest[:12]}...) matches no registry entry"
            f"{f' of {args.name}' if args.name else ''}; use it unverified with --model {source}"
        )
    for entry in matching:
        path = import_file(entry, source)
        progress.log(f"{entry.name} ({entry.task}): imported and verified, {path}")
    return EXIT_OK


def _run_verify(args: argparse.Namespace, progress) -> int:
    entries = _named(args.name, None) if args.name else [e for e in _entries() if e.installed]
    bad = 0
    for entry in entries:
        if not entry.installed:
            progress.log(f"{entry.name} ({entry.task}): not installed ({entry.state})")
            bad += 1
        elif registry.sha256_file(entry.file) != entry.sha256:
            progress.log(f"{entry.name} ({entry.task}): CHECKSUM MISMATCH {entry.file}")
            bad += 1
        else:
            progress.log(f"{entry.name} ({entry.task}): ok")
    if bad:
        raise InputError(f"{bad} of {len(entries)} models failed verification")
    return EXIT_OK
