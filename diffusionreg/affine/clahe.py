"""Contrast-limited adaptive histogram equalisation (CLAHE) in 3D, for venous MRI (spec
``spatial_diffusion.md`` 1.6: min-max, then CLAHE with a 32-voxel kernel at about 1 mm and clip 0.05).

The volume (values in [0, 1]) is cut into tiles of ``kernel`` voxels. Each tile's histogram is
clipped at ``clip_limit`` times its voxel count (at least one count per bin) and the clipped excess
spread evenly over all bins; the tile's mapping is then its cumulative histogram scaled to [0, 1].
A voxel takes the trilinear blend of the mappings of the (up to) eight tiles whose centres
surround it, so there are no seams at tile borders. Output in [0, 1], float32.
"""

from __future__ import annotations

import numpy as np


def clahe(volume: np.ndarray, kernel: tuple[int, int, int], clip_limit: float, bins: int = 256) -> np.ndarray:
    """CLAHE of ``volume`` (values in [0, 1]) with tiles of ``kernel`` voxels; see the module docstring."""
    volume = np.clip(np.asarray(volume, dtype=np.float32), 0.0, 1.0)
    kernel = tuple(max(1, min(int(k), n)) for k, n in zip(kernel, volume.shape))
    tiles = tuple(int(np.ceil(n / k)) for n, k in zip(volume.shape, kernel))
    padded_shape = tuple(t * k for t, k in zip(tiles, kernel))
    # Edge padding completes the last tiles with the border values (it adds no new intensities).
    padded = np.pad(volume, [(0, p - n) for p, n in zip(padded_shape, volume.shape)], mode="edge")
    level = np.minimum((padded * bins).astype(np.int64), bins - 1)
    # Tile id of every voxel, then one bincount for all the tile histograms at once.
    blocks = level.reshape(tiles[0], kernel[0], tiles[1], kernel[1], tiles[2], kernel[2]).transpose(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(-1, int(np.prod(kernel)))
    tile_id = np.arange(blocks.shape[0])[:, None]
    hist = np.bincount((tile_id * bins + blocks).ravel(), minlength=blocks.shape[0] * bins).reshape(-1, bins)
    hist = hist.astype(np.float64)
    voxels = float(np.prod(kernel))
    limit = max(clip_limit * voxels, voxels / bins)  # never below a flat histogram's height
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    mapping = np.cumsum(hist, axis=1)
    mapping = (mapping / mapping[:, -1:]).reshape(*tiles, bins)

    # Trilinear blend between the mappings of the tile centres around each voxel.
    index = np.minimum((volume * bins).astype(np.int64), bins - 1)
    low, high, weight = [], [], []
    for axis, (n, k, t) in enumerate(zip(volume.shape, kernel, tiles)):
        position = (np.arange(n) + 0.5) / k - 0.5  # in tile-centre units
        lo = np.clip(np.floor(position).astype(np.int64), 0, t - 1)
        hi = np.minimum(lo + 1, t - 1)
        w = np.clip(position - lo, 0.0, 1.0)
        shape = [1, 1, 1]
        shape[axis] = n
        low.append(lo.reshape(shape))
        high.append(hi.reshape(shape))
        weight.append(w.reshape(shape))
    out = np.zeros(volume.shape, dtype=np.float64)
    for ci in (0, 1):
        for cj in (0, 1):
            for ck in (0, 1):
                a = high[0] if ci else low[0]
                b = high[1] if cj else low[1]
                c = high[2] if ck else low[2]
                w = (weight[0] if ci else 1 - weight[0]) * (weight[1] if cj else 1 - weight[1])
                w = w * (weight[2] if ck else 1 - weight[2])
                out += w * mapping[a, b, c, index]
    return out.astype(np.float32)
