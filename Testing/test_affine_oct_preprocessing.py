"""OCT/OCTA network input (issue 16): the Gabor thresholds hold on min-max volumes, and training
feeds the network through the same window and filter as inference. Synthetic layered volumes
(retina-like bright and dark bands along the axial axis, speckle, 0.1 % saturated voxels)."""

from __future__ import annotations

import numpy as np
import torch

from diffusionreg.affine.gabor import GaborBinarize
from diffusionreg.affine.preprocess import intensity_window, network_filter, network_window, normalise
from diffusionreg.affine.schedule import Schedule
from diffusionreg.affine.training import batch_loss, frobenius_loss, load_subject, make_batch
from diffusionreg.image import Image, write_image


def layered_volume(seed: int = 0, shape=(40, 64, 40)) -> np.ndarray:
    """Bands along axis 1 (the axial direction), multiplicative speckle, 0.1 % saturated voxels."""
    rng = np.random.default_rng(seed)
    depth = np.arange(shape[1], dtype=np.float64)
    profile = 30.0 + 70.0 * (np.sin(depth / 2.5) > 0.3) + 40.0 * np.exp(-(((depth - 30.0) / 6.0) ** 2))
    volume = np.clip(profile[None, :, None] * rng.gamma(16.0, 1.0 / 16.0, size=shape), 0.0, 255.0)
    volume[rng.random(shape) < 0.001] = 255.0  # saturated speckle of 8-bit data
    return volume.astype(np.float32)


def gabor_mask(array: np.ndarray, window: tuple[float, float], kind: str) -> np.ndarray:
    tensor = torch.from_numpy(normalise(array, window))[None, None]
    return GaborBinarize()(tensor, kind)[0, 0].numpy()


def test_gabor_thresholds_hold_on_the_oct_window():
    from diffusionreg.affine.config import compact

    cfg = compact()
    volume = layered_volume()
    for kind in ("oct", "octa"):
        window = network_window(volume, cfg, kind)
        assert window == (float(volume.min()), float(volume.max())), "OCT/OCTA: min-max, as the thresholds assume"
        spec = torch.from_numpy((volume - volume.min()) / (volume.max() - volume.min()) * 2 - 1)[None, None]
        expected = GaborBinarize()(spec.float(), kind)[0, 0].numpy()
        np.testing.assert_array_equal(gabor_mask(volume, window, kind), expected)
        # The percentile window of the other modalities would have shifted the thresholds:
        clipped = gabor_mask(volume, intensity_window(volume, cfg.intensity_percentile), kind)
        assert np.mean(clipped != expected) > 0.05
    assert network_window(volume, cfg, "mri") == intensity_window(volume, cfg.intensity_percentile)
    assert network_filter("oct") == "oct" and network_filter("octa") == "octa"
    assert network_filter("mri") == network_filter("venous") == network_filter(None) == "none"


def test_training_reads_and_filters_oct_like_inference(tmp_path):
    from tiny_models import tiny_affine_config

    from diffusionreg.affine.register import build_model

    cfg = tiny_affine_config()
    path = tmp_path / "layered.nii.gz"
    write_image(Image(layered_volume(1, (60, 96, 60)), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    as_oct = load_subject(path, cfg, "oct")
    as_mri = load_subject(path, cfg, "mri")
    # min-max leaves the layers darker than the percentile window, which stretches them
    assert float((as_oct - as_mri).max()) <= 1e-6 and float((as_mri - as_oct).max()) > 0.1
    model = build_model(cfg).net
    sched = Schedule.from_config(cfg)
    batch = make_batch([as_oct], cfg, sched, torch.Generator().manual_seed(0), "oct", batch_size=2)
    x, t, _, target, _ = batch
    with torch.no_grad():
        filtered = float(frobenius_loss(model(x, t, None, "oct"), target))
        plain = float(frobenius_loss(model(x, t, None, "none"), target))
        assert abs(filtered - plain) > 1e-6, "the filter changes what the network sees"
        assert float(batch_loss(model, batch, cfg, "oct")) == filtered
        assert float(batch_loss(model, batch, cfg, "mri")) == plain
