"""Paired-data generator benchmark: speed, codebook, novelty, realism, and what the pairs are worth.

Measured on the generator given by --model (default the shipped ``lung-vessels-pairs``) and the
pairs ``diffusionreg synth`` wrote into --pairs (its manifest.json):

* generation time per pair (from the manifest, this CPU) and peak memory of this process while
  it generates --time-pairs fresh pairs;
* codebook use of the training token grids (codes used, perplexity);
* novelty: the histogram of each generated pair's highest Dice to a training volume (target: none
  above 0.9);
* realism: vessel fraction and fixed/moving overlap of generated pairs next to the real training
  and validation pairs (same frame, same figures), and the zero-shot displacement a deformable
  model finds in generated and in real pairs;
* the registration ablation: zero-shot and default landmark TRE on the validation pairs of the
  networks trained on real pairs only and on real + generated pairs, read from the deformable
  benchmark's JSON results (``bench/deformable.py --run-name ...``) given by --tre NAME=JSON;
* a PNG: maximum-intensity projections of fixed (magenta) and moving (green) for generated pairs
  beside real ones.

    .venv/bin/python bench/synth.py --pairs /path/to/generated [--model lung-vessels-pairs]
        [--tre real10=bench/out/deformable_real10.json --tre synth=bench/out/deformable_synth.json]

Writes bench/out/synth.md and bench/out/synth.png (copy them to bench/results/ to publish).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "lung"
OUT = REPO / "bench" / "out"


def real_pairs(folder: Path, frame) -> list:
    from diffusionreg.deformable.training import list_pairs
    from diffusionreg.synth.frame import load_framed_pair

    return [load_framed_pair(a, b, frame) for a, b, _ in list_pairs([str(folder)])]


def figures_of(volumes: np.ndarray) -> dict:
    from diffusionreg.synth.generate import realism_figures

    return realism_figures(volumes.astype(np.float32))


def displacement_of(volumes: np.ndarray, grid, model) -> float:
    from diffusionreg.synth.generate import displacement_figure

    return displacement_figure(volumes.astype(np.float32), grid, model)["displacement_mean_mm"]


def mip_panel(pairs: list[np.ndarray], titles: list[str], path: Path) -> None:
    """Rows of coronal MIPs: fixed in magenta, moving in green (white where they overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(2.6 * len(pairs), 3.0))
    for ax, volumes, title in zip(np.atleast_1d(axes), pairs, titles):
        fixed = volumes[0].max(axis=1).T[::-1]
        moving = volumes[1].max(axis=1).T[::-1]
        ax.imshow(np.clip(np.stack([fixed, moving, fixed], -1), 0, 1))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tre_rows(named: list[str]) -> list[str]:
    rows = []
    for item in named:
        name, path = item.split("=", 1)
        results = json.loads(Path(path).read_text())
        for method in sorted({r["method"] for r in results if r.get("task") == "lung"}):
            rs = [r for r in results if r.get("task") == "lung" and r["method"] == method]
            values = np.concatenate([np.asarray(r["tre_values"]) for r in rs])
            rows.append(
                f"| {name} | {method} | {len(rs)} | {values.mean():.2f} | {np.median(values):.2f} | "
                f"{np.percentile(values, 25):.2f} / {np.percentile(values, 75):.2f} | "
                f"{np.mean([r['seconds'] for r in rs]):.0f} |"
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lung-vessels-pairs")
    ap.add_argument("--pairs", type=Path, required=True, help="folder written by diffusionreg synth (with manifest.json)")
    ap.add_argument("--time-pairs", type=int, default=2, help="fresh pairs generated here for time and peak memory")
    ap.add_argument("--realism-model", default="lung-vessels", help="deformable model for the displacement figure")
    ap.add_argument("--realism-pairs", type=int, default=6, help="generated and real pairs registered for it")
    ap.add_argument("--tre", action="append", default=[], help="NAME=deformable benchmark JSON (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from diffusionreg.deformable.register import load_model
    from diffusionreg.image import read_image
    from diffusionreg.synth.generate import NoveltyReference, generate_pair, load_generator
    from diffusionreg.synth.vqae import codebook_usage

    gen = load_generator(args.model)
    cfg = gen.config
    manifest = json.loads((args.pairs / "manifest.json").read_text())
    pairs = manifest["pairs"]
    generated = [
        np.stack([read_image(args.pairs / p["fixed"]).array, read_image(args.pairs / p["moving"]).array]).astype(np.float32)
        for p in pairs
    ]

    # time and memory of fresh pairs in this process
    reference = NoveltyReference(gen)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    for i in range(args.time_pairs):
        volumes, tokens = generate_pair(gen, 10_000 + i, 0, cfg.sampling.steps, cfg.sampling.temperature)
        reference.figures(volumes, tokens)
    seconds_per_pair = (time.perf_counter() - t0) / max(args.time_pairs, 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    usage = codebook_usage(gen.model.training_tokens, cfg.vqae.num_embeddings)
    novelty = np.array([max(p["novelty"]["nearest_dice_fixed"], p["novelty"]["nearest_dice_moving"]) for p in pairs])
    histogram, edges = np.histogram(novelty, bins=np.linspace(0.0, 1.0, 11))

    train = real_pairs(DATA / "vessels_train10", cfg.frame)
    val = real_pairs(DATA / "vessels_val_cc_by", cfg.frame)
    realism_model = load_model(args.realism_model)
    rows = []
    for label, items in (
        ("generated", [(v, gen.grid) for v in generated]),
        ("real, training (10)", [(p.volumes, p.grid) for p in train]),
        ("real, validation (8)", [(p.volumes, p.grid) for p in val]),
    ):
        figs = [figures_of(v) for v, _ in items]
        disp = [displacement_of(v, g, realism_model) for v, g in items[: args.realism_pairs]]
        rows.append(
            f"| {label} | {len(items)} | {np.mean([f['vessel_fraction'] for f in figs]):.4f} | "
            f"{np.mean([f['overlap_dice'] for f in figs]):.3f} | {np.mean(disp):.2f} ({len(disp)} pairs) |"
        )

    OUT.mkdir(parents=True, exist_ok=True)
    shown = generated[:4] + [p.volumes for p in train[:2]]
    titles = [f"generated {p['index']}" for p in pairs[:4]] + [f"real {p.name}" for p in train[:2]]
    mip_panel(shown, titles, OUT / "synth.png")

    lines = [
        "# Paired-data generator benchmark",
        "",
        f"Command: `.venv/bin/python bench/synth.py {shlex.join(sys.argv[1:])}`  ",
        f"Model `{gen.name}` (config {cfg.name}: frame {cfg.frame.shape} at {cfg.frame.spacing_mm} mm, tokens "
        f"{cfg.token_grid}, {cfg.vqae.num_embeddings} codes); pairs from `{manifest['model']}`, seed {manifest['seed']}, "
        f"{manifest['steps']} steps, temperature {manifest['temperature']}. 2 shared CPU cores, {args.threads} thread.",
        "",
        "## Speed and memory",
        "",
        f"- generation: **{seconds_per_pair:.1f} s per pair** here ({args.time_pairs} fresh pairs, sampling + decoding + "
        f"novelty); {manifest['summary']['seconds_per_pair']:.1f} s per pair in the run that wrote the pairs",
        f"- peak resident memory of this process: {peak_mb:.0f} MB (before generating: {rss_before:.0f} MB)",
        "",
        "## Codebook",
        "",
        f"- training token grids: {usage['codes_used']} of {cfg.vqae.num_embeddings} codes used "
        f"({100 * usage['usage']:.0f}%), perplexity {usage['perplexity']:.1f} (the reference's shipped tokens: 72 of 1,024)",
        "",
        "## Novelty (highest Dice of a generated scan to any training scan, as the generator decodes them)",
        "",
        f"- {len(pairs)} pairs: max {novelty.max():.3f}, mean {novelty.mean():.3f}; above 0.9 (memorised): "
        f"{int((novelty > 0.9).sum())}",
        "",
        "| Dice bin | " + " | ".join(f"{edges[i]:.1f}-{edges[i + 1]:.1f}" for i in range(len(histogram))) + " |",
        "|---|" + "---|" * len(histogram),
        "| pairs | " + " | ".join(str(int(h)) for h in histogram) + " |",
        "",
        "## Realism (frame of the generator; soft maps)",
        "",
        "| pairs | n | vessel fraction | fixed/moving soft Dice | zero-shot displacement over vessels (mm) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    if args.tre:
        lines += [
            "## Registration trained on real vs real + generated pairs (landmark TRE, validation pairs)",
            "",
            "| network | method | pairs | TRE mean (mm) | median | q25 / q75 | s / pair |",
            "|---|---|---|---|---|---|---|",
            *tre_rows(args.tre),
            "",
        ]
    lines += ["![generated and real pairs](synth.png)", ""]
    (OUT / "synth.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
