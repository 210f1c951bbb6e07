"""``diffusionreg midline --input CT --output-json R.json [...]``: the measurement command.

Light to import (the batch's task table imports it when the command line is built): torch and
the networks are imported by the steps that use them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import TYPE_CHECKING

from diffusionreg.errors import InputError
from diffusionreg.vocabulary import EXIT_OK

from .markups import markups_json

if TYPE_CHECKING:
    from diffusionreg.image import Image

    from .measure import MidlineResult
    from .network import MidlineModel

#: At least one of these must be given (a measurement nobody reads is refused up front).
OUTPUT_FLAGS = ("--output-json", "--output-landmarks", "--output-field", "--output-table")


def prepare_measure(args: argparse.Namespace, progress):
    """Check the options and declare the outputs (before any reading); an OutputSet."""
    from diffusionreg.image import OUTPUT_IMAGE_SUFFIXES
    from diffusionreg.outputs import OutputSet

    if args.input is None:
        raise InputError("--input is required (a head CT file or DICOM folder)")
    if not any(getattr(args, f.lstrip("-").replace("-", "_")) for f in OUTPUT_FLAGS):
        raise InputError(f"give at least one output ({', '.join(OUTPUT_FLAGS)})")
    outputs = OutputSet.from_args(args, ("--input",), progress)
    outputs.add("--output-json", args.output_json, (".json",))
    outputs.add("--output-landmarks", args.output_landmarks, (".mrk.json",))
    outputs.add("--output-field", args.output_field, OUTPUT_IMAGE_SUFFIXES)
    outputs.add("--output-table", args.output_table, (".csv",))
    return outputs


def run_measure(args: argparse.Namespace, progress) -> int:
    from diffusionreg.devices import resolve_device

    outputs = prepare_measure(args, progress)
    with outputs:
        with progress.stage("read", total=2) as stage:
            ct = read_measure_input(args)
            stage.update(message="CT")
            model, name = load_measure_model(args, resolve_device(args.device))
            stage.update(message=f"model {name}")
        result = finish_measure(args, outputs, ct, (model, name), progress)
    for note in result.notes():
        print(f"note: {args.input}: {note}", file=sys.stderr)
    flag = f"FLAG (>= {result.flag_mm:.0f} mm)" if result.flag else f"below {result.flag_mm:.0f} mm"
    progress.log(
        f"midline shift {result.case_mls_mm:.1f} mm ({result.side}), {flag}; slice {result.max_slice}; model {name}; "
        f"{sum(result.seconds.values()):.1f} s"
    )
    return EXIT_OK


# The command in steps, so that ``diffusionreg batch`` can check a row without running it, read a
# case's CT ahead on a worker thread and measure many cases with one loaded model.


def read_measure_input(args: argparse.Namespace) -> Image:
    """Read ``--input`` (the head CT, a file or DICOM folder; HU detection happens when measuring)."""
    from diffusionreg.image import read_image

    return read_image(args.input, what="CT")


def load_measure_model(args: argparse.Namespace, device) -> tuple[MidlineModel, str]:
    """The ``--model`` (sha256 checked) on ``device``, and its name."""
    from .model_loading import load_midline_model

    model, name = load_midline_model(args.model)
    return model.to(device).eval(), name


def finish_measure(args: argparse.Namespace, outputs, ct: Image, loaded: tuple[MidlineModel, str], progress) -> MidlineResult:
    """Measure ``ct`` with a loaded ``(model, name)``, write every declared output and commit them."""
    from diffusionreg.devices import resolve_device
    from diffusionreg.image import write_image

    from .measure import displacement_field, measure_midline

    model, name = loaded
    levels = len(model.cfg.inference.pose_levels_mm) + 1
    with progress.stage("measure", total=levels) as stage:
        result = measure_midline(ct, model, name, resolve_device(args.device), stage)
    with progress.stage("write", total=1):
        if outputs.wants("--output-json"):
            outputs.temporary("--output-json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        if outputs.wants("--output-landmarks"):
            outputs.temporary("--output-landmarks").write_text(_landmarks(result), encoding="utf-8")
        if outputs.wants("--output-field"):
            write_image(displacement_field(ct.grid, result, model.cfg), outputs.temporary("--output-field"))
        if outputs.wants("--output-table"):
            _write_table(result, outputs.temporary("--output-table"))
    outputs.commit()
    return result


def _landmarks(result: MidlineResult) -> str:
    from .measure import LANDMARK_NAMES

    points = []
    for s in result.slices:
        for name in LANDMARK_NAMES:
            points.append(
                (
                    f"{name} s{s.index}",
                    f"slice {s.index} (template z {s.z_template_mm:g} mm), MLS {s.mls_mm:.2f} mm",
                    s.landmarks[name],
                )
            )
    return markups_json(points)


def _write_table(result: MidlineResult, path) -> None:
    from .measure import LANDMARK_NAMES

    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        header = ["slice", "z_template_mm", "mls_mm", "side", "rows_read"]
        for name in LANDMARK_NAMES:
            header += [f"{name}_{axis}_lps_mm" for axis in "xyz"]
        writer.writerow(header)
        for s in result.slices:
            row = [s.index, f"{s.z_template_mm:g}", f"{s.mls_mm:.4f}", s.side, s.rows_read]
            for name in LANDMARK_NAMES:
                row += [f"{v:.4f}" for v in s.landmarks[name]]
            writer.writerow(row)
