"""The paired-data generator: frame geometry, VQ-AE losses and codebook care, and the commands
end to end on a tiny configuration over real lung-vessel pairs (``diffusionreg train synth``,
``diffusionreg synth``, ``diffusionreg train deformable --synthetic-pairs``)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import REPO, run_cli

from diffusionreg.image import as_probability, read_image
from diffusionreg.spaces import apply_affine
from diffusionreg.synth.config import SynthConfig, compact, full
from diffusionreg.synth.frame import load_framed_pair
from diffusionreg.synth.vqae import PairedVQAE, codebook_usage, reconstruction_loss

CASE = "case_032"


def tiny_config() -> SynthConfig:
    """A few-second configuration: 16^3 frame at 18 mm, 4^3 tokens, a one-layer prior (``tiny_models``)."""
    from tiny_models import tiny_synth_config

    return tiny_synth_config()


@pytest.fixture(scope="module")
def lung_pair(shared_data: Path) -> tuple[Path, Path]:
    folder = shared_data / "lung" / "vessels_train10"
    return folder / f"{CASE}_1.nii.gz", folder / f"{CASE}_2.nii.gz"


# ----------------------------------------------------------------------------- config and frame
def test_presets_give_the_documented_token_grids():
    assert compact().token_grid == (12, 10, 12) and compact().num_tokens == 1440
    assert full().token_grid == (16, 13, 16) and full().num_tokens == 3328  # the paper's grid


def test_config_refuses_a_frame_the_stride_does_not_divide():
    data = compact().to_dict()
    data["frame"]["shape"] = [90, 80, 96]
    with pytest.raises(ValueError, match="divisible"):
        SynthConfig.from_dict(data)


def test_probability_maps_stay_soft_and_label_maps_become_binary():
    labels = np.array([[[0, 1, 2]]], dtype=np.uint8)
    assert as_probability(labels).tolist() == [[[0.0, 1.0, 1.0]]]
    soft = np.array([[[0.001, 0.4, 1.2]]], dtype=np.float32)
    assert np.allclose(as_probability(soft), [[[0.001, 0.4, 1.0]]])  # "> 0" would make all of it vessel


def test_framed_pair_keeps_world_positions(lung_pair):
    """The vessel centre of mass (LPS mm) is where it was in the original scan, and the frame
    matrix written to disk is what SimpleITK and nibabel read back."""
    cfg = compact().frame
    pair = load_framed_pair(*lung_pair, cfg)
    assert pair.volumes.shape == (2, *cfg.shape) and pair.volumes.dtype == np.float32
    original = read_image(lung_pair[0])
    vessel = np.argwhere(np.asarray(original.array) > 0).astype(np.float64)
    centre_original = apply_affine(original.affine, vessel.mean(0))
    weights = pair.volumes[0]
    index = np.argwhere(weights > 0).astype(np.float64)
    centre_framed = apply_affine(pair.grid.affine, np.average(index, axis=0, weights=weights[weights > 0]))
    assert np.linalg.norm(centre_framed - centre_original) < 1.5  # mm; some vessel mass lies outside the frame
    assert np.allclose(pair.grid.spacing, cfg.spacing_mm)


def test_generated_geometry_matches_simpleitk_and_nibabel(tmp_path, lung_pair):
    from diffusionreg.image import Image, write_image

    pair = load_framed_pair(*lung_pair, tiny_config().frame)
    path = write_image(Image(pair.volumes[0], pair.grid.affine), tmp_path / "f.nii.gz")
    itk = sitk.ReadImage(str(path))
    corner = np.array([3.0, 5.0, 7.0])
    lps = itk.TransformContinuousIndexToPhysicalPoint(corner.tolist())
    assert np.allclose(lps, apply_affine(pair.grid.affine, corner), atol=1e-4)
    ras = nib.load(str(path)).affine @ np.append(corner, 1.0)
    assert np.allclose(ras[:3] * [-1, -1, 1], lps, atol=1e-4)


# ----------------------------------------------------------------------------- VQ-AE
def test_reconstruction_loss_is_the_weighted_cross_entropy_of_each_scan():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 2, 2, 2)
    target = torch.rand(1, 2, 2, 2, 2)
    w = torch.tensor([1.0, 2.5])
    expected = 0.0
    for scan in range(2):
        log_p = F.log_softmax(logits[:, 2 * scan : 2 * scan + 2], dim=1)
        p = target[:, scan]
        per_voxel = -(w[0] * (1 - p) * log_p[:, 0] + w[1] * p * log_p[:, 1])
        expected += 0.5 * per_voxel.mean()  # PyTorch's weighted soft-target CE divides by the voxel count
    assert torch.allclose(reconstruction_loss(logits, target, (1.0, 2.5)), expected, atol=1e-6)


def test_dead_codes_restart_on_encoder_outputs():
    model = PairedVQAE(tiny_config().vqae)
    q = model.quantizer
    q.ema_cluster_size.fill_(1.0)
    q.ema_cluster_size[[3, 7]] = 0.0
    encodings = torch.randn(1, q.embedding_dim, 2, 2, 2)
    moved = model.restart_dead_codes(encodings, torch.Generator().manual_seed(0))
    assert moved == 2
    flat = encodings.permute(0, 2, 3, 4, 1).reshape(-1, q.embedding_dim)
    for code in (3, 7):
        assert torch.isclose(torch.cdist(q.embedding.weight[code][None], flat).min(), torch.tensor(0.0), atol=1e-6)
        assert q.ema_cluster_size[code] == 1.0
        assert torch.allclose(q.ema_w[code], q.embedding.weight[code])


def test_codebook_usage_and_perplexity():
    tokens = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    usage = codebook_usage(tokens, 8)
    assert usage["codes_used"] == 4 and usage["usage"] == 0.5
    assert math.isclose(usage["perplexity"], 4.0, rel_tol=1e-9)  # uniform over 4 codes


def test_tokenise_and_decode_shapes():
    model = PairedVQAE(tiny_config().vqae).eval()
    volumes = torch.rand(2, 2, 16, 16, 16)
    tokens = model.tokenise(volumes)
    assert tokens.shape == (2, 4, 4, 4) and tokens.dtype == torch.int64
    decoded = model.decode_tokens(tokens)
    assert decoded.shape == (2, 2, 16, 16, 16) and float(decoded.min()) >= 0 and float(decoded.max()) <= 1


# ----------------------------------------------------------------------------- commands end to end
@pytest.fixture(scope="module")
def trained_generator(tmp_path_factory, lung_pair) -> Path:
    """A tiny generator trained by the real commands on one real pair (both stages)."""
    from tiny_models import write_tiny_generator

    return write_tiny_generator(tmp_path_factory.mktemp("synth"), *lung_pair, tiny_config())


def _synth(model: Path, count: int, seed: int, out: Path) -> None:
    """``diffusionreg synth`` of ``count`` pairs with ``seed`` into ``out``, as a user runs it."""
    run_cli("synth", "--model", str(model), "--count", str(count), "--seed", str(seed), "--output", str(out),
            "--progress", "none", check=True)  # fmt: skip


def test_generator_writes_pairs_with_the_canonical_geometry_and_a_manifest(tmp_path, trained_generator):
    out = tmp_path / "pairs"
    out.mkdir()
    _synth(trained_generator, 2, 5, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "manifest.json",
        "pair_000_fixed.nii.gz",
        "pair_000_moving.nii.gz",
        "pair_001_fixed.nii.gz",
        "pair_001_moving.nii.gz",
    ]
    config = json.loads((trained_generator / "config.json").read_text())
    image = read_image(out / "pair_001_moving.nii.gz")
    assert np.allclose(image.affine, np.asarray(config["canonical_affine"]), atol=1e-5)
    assert image.shape == (16, 16, 16) and 0.0 <= float(image.array.min()) and float(image.array.max()) <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 8 and manifest["temperature"] == 0.9  # the model config's sampling defaults
    assert [p["index"] for p in manifest["pairs"]] == [0, 1]
    for pair in manifest["pairs"]:
        assert 0.0 <= pair["novelty"]["nearest_dice_fixed"] <= 1.0
        assert 0.0 <= pair["realism"]["overlap_dice"] <= 1.0
    assert set(manifest["training_reference"]) == {"vessel_fraction", "overlap_dice"}


def test_pair_i_of_a_seed_does_not_depend_on_the_count(tmp_path, trained_generator):
    """Each pair has its own random stream: ranks can split indices and runs can be extended."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _synth(trained_generator, 2, 3, a)
    _synth(trained_generator, 3, 3, b)
    assert np.array_equal(read_image(a / "pair_001_fixed.nii.gz").array, read_image(b / "pair_001_fixed.nii.gz").array)
    c = tmp_path / "c"
    c.mkdir()
    _synth(trained_generator, 2, 4, c)
    manifests = [json.loads((d / "manifest.json").read_text())["pairs"][1]["novelty"] for d in (a, c)]
    assert not np.array_equal(read_image(a / "pair_001_fixed.nii.gz").array, read_image(c / "pair_001_fixed.nii.gz").array) or (
        manifests[0] != manifests[1]
    )


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--count", "0"], "--count"),
        (["--count", "2", "--temperature", "0"], "--temperature"),
        (["--count", "1", "--steps", "0"], "--steps"),
    ],
)
def test_bad_generation_arguments_are_one_line_and_exit_2(tmp_path, trained_generator, args, phrase):
    out = tmp_path / "o"
    out.mkdir()
    done = run_cli("synth", "--model", str(trained_generator), *args, "--output", str(out), "--progress", "none")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0]
    assert not any(out.iterdir())


def test_missing_output_folder_is_refused_before_work(tmp_path, trained_generator):
    done = run_cli(
        "synth", "--model", str(trained_generator), "--count", "1", "--output", str(tmp_path / "nowhere"), "--progress", "none"
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: --output {tmp_path / 'nowhere'}: not an existing folder"]


def test_a_vqae_run_is_not_a_generator(tmp_path, trained_generator):
    out = tmp_path / "o"
    out.mkdir()
    vqae = trained_generator.parent.parent / "vqae"
    done = run_cli("synth", "--model", str(vqae / "best"), "--count", "1", "--output", str(out), "--progress", "none")
    assert done.returncode == 2 and "not a trained generator" in done.stderr
    assert not any(out.iterdir())


def test_deformable_training_takes_generated_pairs(tmp_path, trained_generator, lung_pair):
    """``--synthetic-pairs`` reads pair_NNN_fixed/_moving folders; soft maps stay soft (probability)."""
    from diffusionreg.deformable.training import list_pairs

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    run_cli("synth", "--model", str(trained_generator), "--count", "2", "--output", str(pairs), "--progress", "none", check=True)
    found = list_pairs([str(pairs)])
    assert [(a.name, b.name) for a, b, _ in found] == [
        ("pair_000_fixed.nii.gz", "pair_000_moving.nii.gz"),
        ("pair_001_fixed.nii.gz", "pair_001_moving.nii.gz"),
    ]
    config = tmp_path / "icon.json"
    from diffusionreg.deformable.config import get_config

    cfg = json.loads(get_config("lung-icon").to_json())
    cfg.update(grid_shape=[32, 32, 32], spacing_mm=9.0, synthetic_fraction=1.0)  # the smallest grid the box smoothing takes
    config.write_text(json.dumps(cfg))
    done = run_cli(
        "train", "deformable", "--method", "icon", "--config", str(config), "--pairs", f"{lung_pair[0]},{lung_pair[1]}",
        "--synthetic-pairs", str(pairs), "--steps", "2", "--threads", "1", "--progress", "none", "--output", str(tmp_path / "run"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "+ 2 synthetic pairs" in done.stdout


def test_first_index_makes_the_pairs_a_longer_run_would(tmp_path, trained_generator):
    """The Slicer panel generates one pair per process (keeping finished pairs on cancel)."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    whole.mkdir(), part.mkdir()
    common = ["--model", str(trained_generator), "--seed", "9", "--progress", "none"]
    run_cli("synth", *common, "--count", "3", "--output", str(whole), check=True)
    run_cli("synth", *common, "--count", "1", "--first-index", "2", "--output", str(part), check=True)
    assert sorted(p.name for p in part.iterdir()) == ["manifest.json", "pair_002_fixed.nii.gz", "pair_002_moving.nii.gz"]
    for name in ("pair_002_fixed.nii.gz", "pair_002_moving.nii.gz"):
        assert np.array_equal(read_image(whole / name).array, read_image(part / name).array)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cancel_during_generation_leaves_the_folder_as_it_was(tmp_path, trained_generator, signum):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pair_000_fixed.nii.gz").write_bytes(b"an earlier file that must survive\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusionreg", "synth", "--model", str(trained_generator), "--count", "3",
         "--steps", "2000", "--output", str(out), "--progress", "json", "--overwrite"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", cwd=REPO,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("{") and json.loads(line)["stage"] == "generate" and "pair 2/3" in json.loads(line)["message"]:
            break
    process.send_signal(signum)
    process.communicate(timeout=120)
    assert process.returncode == 130
    assert sorted(p.name for p in out.iterdir()) == ["pair_000_fixed.nii.gz"]  # no temporaries, nothing new
    assert (out / "pair_000_fixed.nii.gz").read_bytes() == b"an earlier file that must survive\n"


@pytest.mark.slow
def test_torchrun_ranks_split_the_pairs(tmp_path, trained_generator):
    """Two gloo ranks make pairs 0, 2 and 1; rank 0's manifest lists all three, and each pair is
    the one a single process makes."""
    split, single = tmp_path / "split", tmp_path / "single"
    split.mkdir(), single.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "diffusionreg",
         "synth", "--model", str(trained_generator), "--count", "3", "--seed", "2", "--output", str(split), "--progress", "none"],
        capture_output=True, encoding="utf-8", cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads((split / "manifest.json").read_text())
    assert [p["index"] for p in manifest["pairs"]] == [0, 1, 2] and manifest["summary"]["pairs"] == 3
    _synth(trained_generator, 3, 2, single)
    for i in range(3):
        for scan in ("fixed", "moving"):
            name = f"pair_{i:03d}_{scan}.nii.gz"
            assert np.array_equal(read_image(split / name).array, read_image(single / name).array)
