"""The cohort CSV: one row per case, its columns the single commands' options; every row checked first.

Columns: ``task`` (affine, deformable, midline, evaluate), ``id`` (the case's folder name under the output
folder: letters, digits, ``.``, ``_``, ``-``; unique), then any option of that task's command
without its dashes (``fixed``, ``moving``, ``output_transform`` or ``output-transform``,
``refine_iterations``, ...; a midline row: ``input``, ``model`` and its outputs). An empty cell leaves the option unset. Input files are relative to
the CSV's folder; outputs are plain file names written into ``OUT/<id>/`` (the required ones and
the JSON the metrics come from have default names). Switches take ``true``/``false``; repeatable
options (``transform``) take several values separated by ``;``. ``device``, ``progress``,
``quiet`` and ``overwrite`` are set once on the batch command line.

Each row becomes an argument list parsed by the single command's own parser (one definition of
each option), then the command's own output and option checks run against a scratch folder and
input files must exist. The first bad row stops everything with its row number (the header is
row 1) before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diffusionreg.errors import InputError

from .tasks import BATCH_TASKS, STEPS

#: Case ids name folders: no separators, no hidden names.
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Options of every command that belong to the batch command line, not to a row.
BATCH_LEVEL_OPTIONS = ("device", "progress", "quiet", "overwrite")
#: Separator of the values of a repeatable option in one cell.
LIST_SEPARATOR = ";"
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class Case:
    """One checked row: what to run and where its outputs go."""

    index: int  # position in the cohort (0-based, CSV order)
    row: int  # row number in the CSV (the header is row 1)
    id: str
    task: str
    argv: tuple[str, ...]  # the task command's options, inputs resolved, outputs in the case folder
    digest: str  # sha256 of the row: a changed row is run again by --resume

    def parse(self, parsers: dict[str, argparse.ArgumentParser], device: str, overwrite: bool) -> argparse.Namespace:
        """The parsed options, with the batch's device and overwrite choice and no output of its own."""
        args = parse_options(parsers[self.task], [*self.argv, f"--device={device}", "--progress=none"])
        args.overwrite = overwrite
        return args


class RowError(InputError):
    """A bad CSV row: the message names the file and the row."""


def parse_options(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with the command's own parser; its usage error comes back as InputError, not an exit."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parser.parse_args(argv)
    except SystemExit:
        lines = [line for line in captured.getvalue().splitlines() if line.startswith("error:")]
        raise InputError(lines[-1][len("error:") :].strip() if lines else "bad options") from None


def read_cases(jobs: Path, out: Path, parsers: dict[str, argparse.ArgumentParser]) -> list[Case]:
    """Every row of ``jobs`` checked and turned into a :class:`Case` (outputs under ``out``); RowError."""
    if not jobs.is_file():
        raise InputError(f"--jobs {jobs}: file not found")
    with jobs.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise InputError(f"--jobs {jobs} is empty; its first row names the columns (task,id,...)")
        columns = [_column(name) for name in header]
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise InputError(f"--jobs {jobs}: column {duplicated[0]} appears twice")
        for needed in ("task", "id"):
            if needed not in columns:
                raise InputError(f"--jobs {jobs} has no '{needed}' column (columns: {', '.join(columns)})")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank lines are allowed
            if len(values) != len(columns):
                raise RowError(f"{jobs} row {reader.line_num}: {len(values)} values but {len(columns)} columns")
            rows.append((reader.line_num, dict(zip(columns, (v.strip() for v in values)))))
    if not rows:
        raise InputError(f"--jobs {jobs} has no cases")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="diffusionreg-batch-check-") as scratch:
        for index, (line, row) in enumerate(rows):
            if row["id"] in seen:
                raise RowError(f"{jobs} row {line}: id {row['id']} is also the id of row {seen[row['id']]}")
            seen[row["id"]] = line
            try:
                cases.append(_case(index, line, row, jobs.resolve().parent, out, parsers, Path(scratch)))
            except InputError as error:  # the checks ran on the scratch folder: name the real one
                problem = str(error).replace(scratch, str(out))
                raise RowError(f"{jobs} row {line}{_named(row)}: {problem}") from None
    return cases


def _column(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _named(row: dict) -> str:
    return f" (id {row['id']})" if row.get("id") else ""


def _case(index: int, line: int, row: dict, base: Path, out: Path, parsers, scratch: Path) -> Case:
    task = row["task"].lower()
    if task not in BATCH_TASKS:
        raise InputError(f"unknown task {row['task']!r}; use {', '.join(BATCH_TASKS)}")
    case_id = row["id"]
    if not CASE_ID.match(case_id):
        raise InputError(f"id {case_id!r} must be letters, digits, '.', '_' or '-' (it names the case's folder)")
    parser = parsers[task]
    options = {k: v for k, v in row.items() if k not in ("task", "id") and v != ""}
    argv = _argv(task, options, parser, base, out / case_id)
    # The command's own checks, on a scratch case folder (nothing is written there either).
    (scratch / case_id).mkdir()
    check_argv = _argv(task, options, parser, base, scratch / case_id)
    args = parse_options(parser, check_argv)
    _check_inputs_exist(args, parser)
    STEPS[task].check(args)
    digest = hashlib.sha256(json.dumps([task, case_id, sorted(options.items())]).encode()).hexdigest()
    return Case(index, line, case_id, task, tuple(argv), digest)


def _argv(task: str, options: dict[str, str], parser: argparse.ArgumentParser, base: Path, folder: Path) -> list[str]:
    """The command-line options of one row (``--name=value`` so values may start with '-')."""
    actions = parser._option_string_actions  # argparse's table of option strings (stable since 3.2)
    argv: list[str] = []
    for name, value in options.items():
        if name in BATCH_LEVEL_OPTIONS:
            raise InputError(f"column {name} is set once for the whole batch (diffusionreg batch --{name})")
        action = actions.get(f"--{name}")
        allowed = STEPS[task].columns
        if action is None or name == "help" or (allowed is not None and name not in allowed):
            raise InputError(f"column {name} is not an option of 'diffusionreg {task}'")
        if action.nargs == 0:  # a switch
            argv.extend(_switch(name, value, action))
            continue
        values = value.split(LIST_SEPARATOR) if isinstance(action, argparse._AppendAction) else [value]
        for item in values:
            argv.append(f"--{name}={_path_value(name, item.strip(), action, base, folder)}")
    for name, file_name in STEPS[task].default_outputs.items():
        if name not in options:
            argv.append(f"--{name}={folder / file_name}")
    return argv


def _switch(name: str, value: str, action: argparse.Action) -> list[str]:
    text = value.lower()
    if text not in _TRUE + _FALSE:
        raise InputError(f"column {name} is a switch: write true or false, not {value!r}")
    on = text in _TRUE
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"--{name}" if on else f"--no-{name}"]
    return [f"--{name}"] if on else []


def _path_value(name: str, value: str, action: argparse.Action, base: Path, folder: Path) -> str:
    """Outputs: a file name placed in the case folder. Inputs: relative to the CSV's folder."""
    if action.dest.startswith("output_"):
        if Path(value).name != value or value in (".", ".."):
            raise InputError(f"column {name} must be a file name (it is written into the case's folder), not {value!r}")
        return str(folder / value)
    if action.type is Path:
        return str(base / value) if not Path(value).is_absolute() else value
    if name == "model" and (base / value).exists():  # a model given by path, relative to the CSV
        return str((base / value).resolve())
    return value


def _check_inputs_exist(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.type is not Path or action.dest.startswith("output_"):
            continue
        value = getattr(args, action.dest, None)
        if value is action.default:
            continue  # not given by the row (a default path, e.g. a folder of another mode, is not an input)
        for path in value if isinstance(value, list) else [value]:
            if path is not None and not Path(path).exists():
                raise InputError(f"{action.option_strings[0]} {path}: file not found")
