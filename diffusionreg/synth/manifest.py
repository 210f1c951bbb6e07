"""The manifest of a generation (``manifest.json``): its summary, and merging runs of one generation.

Standard library only: the Slicer side merges the manifests of a generation made one pair per
process (``--first-index``) with these same definitions before the backend's dependencies load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: Most pairs one command makes (the file names have three digits).
MAX_PAIRS = 1000


def nearest_dice(pair: Mapping) -> float:
    """A pair's novelty figure: the higher nearest-training Dice of its two scans."""
    novelty = pair["novelty"]
    return max(float(novelty["nearest_dice_fixed"]), float(novelty["nearest_dice_moving"]))


def summarise(pairs: Sequence[Mapping]) -> dict:
    """Count, memorised pairs, nearest-training Dice (max, mean) and seconds per pair."""
    novelty = [nearest_dice(p) for p in pairs]
    return {
        "pairs": len(pairs),
        "memorised": int(sum(bool(p["novelty"]["memorised"]) for p in pairs)),
        "nearest_dice_max": max(novelty) if novelty else None,
        "nearest_dice_mean": sum(novelty) / len(novelty) if novelty else None,
        "seconds_per_pair": sum(float(p["seconds"]) for p in pairs) / len(pairs) if pairs else None,
    }


def assemble(header: Mapping, pairs: Sequence[Mapping]) -> dict:
    """A manifest: ``header`` (model, seed, sampling, frame, reference figures), the summary and
    every pair in index order."""
    ordered = sorted(pairs, key=lambda p: p["index"])
    return {**header, "summary": summarise(ordered), "pairs": ordered}


def merge(parts: Sequence[Mapping]) -> dict:
    """One manifest for several runs of one generation (same model, seed and sampling)."""
    if not parts:
        raise ValueError("no finished run to merge")
    header = {k: v for k, v in parts[0].items() if k not in ("summary", "pairs")}
    return assemble(header, [p for part in parts for p in part["pairs"]])
