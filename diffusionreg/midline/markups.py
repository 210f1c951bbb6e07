"""Slicer markups JSON (``.mrk.json``) of the measured landmarks: one Fiducial node, LPS mm.

The layout is the one Slicer's ``vtkMRMLMarkupsJsonStorageNode`` writes (schema v1.0.4);
positions are stored in LPS with ``"coordinateSystem": "LPS"``, which Slicer converts to its RAS
scene on loading.
"""

from __future__ import annotations

import json

SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.4.json#"
)
#: Slicer's default orientation of a control point written in LPS (identity in RAS).
LPS_ORIENTATION = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]


def markups_json(points: list[tuple[str, str, list[float]]]) -> str:
    """``(label, description, LPS position)`` triples as the text of a ``.mrk.json`` file."""
    control_points = [
        {
            "id": str(index + 1),
            "label": label,
            "description": description,
            "associatedNodeID": "",
            "position": [float(v) for v in position],
            "orientation": LPS_ORIENTATION,
            "selected": True,
            "locked": True,
            "visibility": True,
            "positionStatus": "defined",
        }
        for index, (label, description, position) in enumerate(points)
    ]
    node = {
        "type": "Fiducial",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": True,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(control_points),
        "controlPoints": control_points,
        "measurements": [],
    }
    return json.dumps({"@schema": SCHEMA, "markups": [node]}, indent=2)
