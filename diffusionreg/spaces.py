"""Coordinate spaces and the exact affine algebra between them.

The one place that says how coordinates are laid out:

* **World** is **LPS, millimetres**, inside the whole backend (the ITK/DICOM convention, so
  transform files and displacement fields need no conversion). RAS appears only at the edges
  (nibabel, Slicer) through :data:`LPS_FROM_RAS`.
* **Voxel** coordinates are array indices ``(i, j, k)`` of ``Image.array`` (nibabel order:
  SimpleITK's ``GetArrayFromImage`` transposed). Voxel centres sit at integer indices.
* **Torch-normalised** coordinates are those of ``torch.nn.functional.affine_grid`` and
  ``grid_sample`` for a tensor ``(B, C, D0, D1, D2)`` holding axes ``(i, j, k)``: the vector is
  ``(x, y, z)`` = axes ``(k, j, i)``. Network matrices use ``align_corners=False``:
  ``n = (2 * index + 1) / size - 1``.

:class:`Space` names each system on a grid (voxel, world, torch with either field-of-view
convention, SITReg's centred-normalised) and gives the exact matrix between any two;
:func:`sample`, :func:`sample_affine` and :func:`rescale_displacement` are the tensor helpers,
so no caller writes a ``grid_sample`` normalisation by hand.

All matrices here are 4x4 homogeneous float64 and act on column vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WORLD = "LPS"
"""The internal world convention (LPS mm)."""

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Converts RAS points to LPS points (and back: it is its own inverse)."""


def homogeneous(linear: np.ndarray, translation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Build a 4x4 matrix from a 3x3 linear part and a 3-vector translation."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(linear, dtype=np.float64)
    matrix[:3, 3] = np.asarray(translation, dtype=np.float64)
    return matrix


def rotation_about_axis(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (any length; right-hand rule, Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def centred_affine(centre: Sequence[float], linear: np.ndarray, translation: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 point map ``x -> L (x - c) + c + t`` (mm, in whatever world ``c`` is given: LPS here)."""
    centre = np.asarray(centre, dtype=np.float64)
    linear = np.asarray(linear, dtype=np.float64)
    return homogeneous(linear, centre + np.asarray(translation, dtype=np.float64) - linear @ centre)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points ``(..., 3)`` through a 4x4 matrix (row-vector points, column-vector algebra)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def ras_to_lps(matrix: np.ndarray) -> np.ndarray:
    """Re-express a voxel-to-RAS matrix (nibabel, Slicer IJKToRAS) as voxel-to-LPS."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=np.float64)


def lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_lps` for voxel-to-world matrices (``LPS_FROM_RAS`` is involutive)."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=np.float64)


def lps_to_ras_transform(matrix: np.ndarray) -> np.ndarray:
    """Re-express an LPS->LPS point map as the same physical map in RAS->RAS."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_FROM_RAS


def affine_from_itk(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Voxel-to-LPS matrix from ITK geometry (origin mm, spacing mm, row-major 3x3 direction)."""
    direction_matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return homogeneous(direction_matrix @ np.diag(np.asarray(spacing, dtype=np.float64)), origin)


def itk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Split a voxel-to-LPS matrix into ITK (origin, spacing, row-major direction)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("voxel-to-world matrix has a zero-length axis")
    direction = linear / spacing
    return tuple(affine[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def voxel_to_normalized(shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """Matrix mapping voxel ``(i, j, k)`` to torch-normalised ``(x, y, z) = f(k, j, i)``.

    ``align_corners=False`` (network matrices): ``n = (2 index + 1) / size - 1``, so the
    outer voxel *faces* sit at -1 and +1. ``align_corners=True``: voxel *centres* at -1, +1.
    (The :func:`torch_space` matrix.)
    """
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"expected a 3D shape, got {shape}")
    return torch_space(shape, align_corners).from_voxel


def normalized_to_voxel(shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """Inverse of :func:`voxel_to_normalized`."""
    return np.linalg.inv(voxel_to_normalized(shape, align_corners))


def world_to_normalized(affine: np.ndarray, shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """Matrix from LPS world to the torch-normalised coordinates of a grid (affine, shape)."""
    return torch_space(shape, align_corners, affine=affine).from_world


def world_transform_from_normalized(
    theta: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_shape: Sequence[int],
    moving_affine: np.ndarray,
    moving_shape: Sequence[int],
    align_corners: bool = False,
) -> np.ndarray:
    """Turn an ``affine_grid`` matrix into an exact LPS point map (fixed world -> moving world).

    ``theta`` (3x4 or 4x4) maps normalised output coordinates of the fixed network grid to
    normalised sampling coordinates of the moving network grid, as ``affine_grid`` does.
    The result maps fixed LPS points to moving LPS points (ITK resampling convention):
    ``T = W_mov N_mov^-1 theta N_fix W_fix^-1``.
    """
    theta4 = np.eye(4)
    theta4[:3, :] = np.asarray(theta, dtype=np.float64)[:3, :]
    fixed_to_norm = world_to_normalized(fixed_affine, fixed_shape, align_corners)
    norm_to_moving = np.linalg.inv(world_to_normalized(moving_affine, moving_shape, align_corners))
    return norm_to_moving @ theta4 @ fixed_to_norm


def normalized_from_world_transform(
    transform: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_shape: Sequence[int],
    moving_affine: np.ndarray,
    moving_shape: Sequence[int],
    align_corners: bool = False,
) -> np.ndarray:
    """Inverse of :func:`world_transform_from_normalized`: an LPS point map as a 3x4 ``theta``."""
    fixed_to_norm = world_to_normalized(fixed_affine, fixed_shape, align_corners)
    moving_to_norm = world_to_normalized(moving_affine, moving_shape, align_corners)
    theta4 = moving_to_norm @ np.asarray(transform, dtype=np.float64) @ np.linalg.inv(fixed_to_norm)
    return theta4[:3, :]


# ----------------------------------------------------------------------------- named spaces

SPACE_KINDS = ("voxel", "world", "torch", "torch_corners", "centred")
"""The coordinate systems a tensor on a grid can be expressed in (see :class:`Space`)."""

_ARRAY_ORDER = (0, 1, 2)
_TORCH_ORDER = (2, 1, 0)  # grid_sample's (x, y, z) = array axes (k, j, i)


@dataclass(frozen=True, eq=False)
class Space:
    """A named coordinate system on a grid of ``shape`` voxels that ``affine`` places in LPS mm.

    Build one with the factories (:func:`voxel_space`, :func:`world_space`, :func:`torch_space`,
    :func:`centred_space`); ``matrix_to`` gives the exact 4x4 map between any two spaces (through
    the world when their grids differ). Kinds:

    * ``voxel``: array indices ``(i, j, k)``, voxel centres at integers.
    * ``world``: LPS mm, ``affine @ (i, j, k, 1)``.
    * ``torch``: ``grid_sample`` / ``affine_grid`` with ``align_corners=False``: per axis
      ``n = (2 index + 1) / size - 1`` (outer voxel faces at -1, +1).
    * ``torch_corners``: ``align_corners=True``: ``n = 2 index / (size - 1) - 1`` (outer voxel
      centres at -1, +1; a size-1 axis maps to -1).
    * ``centred``: SITReg's centred-normalised system: ``n = (index - (size - 1) / 2) 2 / max(shape)``,
      the same scale on every axis (the largest axis' outer faces at -1, +1).

    ``components`` is the order of the coordinate vector: ``"ijk"`` (array order) or ``"xyz"``
    (torch order, array axes (k, j, i)). The torch kinds default to ``"xyz"``, the others to
    ``"ijk"``; a network trained with normalised units in array order names that with
    ``components="ijk"``. Without ``affine`` the world is the voxel index space itself.
    """

    kind: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    components: str

    def __post_init__(self) -> None:
        if self.kind not in SPACE_KINDS:
            raise ValueError(f"unknown space kind {self.kind!r}; expected one of {SPACE_KINDS}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"expected a 3D shape of positive sizes, got {self.shape}")
        if self.components not in ("ijk", "xyz"):
            raise ValueError(f"components must be 'ijk' or 'xyz', got {self.components!r}")

    @property
    def order(self) -> tuple[int, int, int]:
        """Array axis of each coordinate component."""
        return _ARRAY_ORDER if self.components == "ijk" else _TORCH_ORDER

    def axis_scale_offset(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-component ``(scale, offset)`` with ``coordinate[c] = scale[c] index[order[c]] + offset[c]``,
        or None for the world (a general matrix)."""
        sizes = np.asarray([self.shape[axis] for axis in self.order], dtype=np.float64)
        if self.kind == "voxel":
            return np.ones(3), np.zeros(3)
        if self.kind == "torch":
            return 2.0 / sizes, 1.0 / sizes - 1.0
        if self.kind == "torch_corners":
            return 2.0 / np.maximum(sizes - 1.0, 1.0), -np.ones(3)
        if self.kind == "centred":
            scale = 2.0 / max(self.shape)
            return np.full(3, scale), -scale * (sizes - 1.0) / 2.0
        return None

    @property
    def from_voxel(self) -> np.ndarray:
        """4x4 map from voxel indices ``(i, j, k)`` of the grid to this space's coordinates."""
        if self.kind == "world":
            return np.array(self.affine, dtype=np.float64)
        scale, offset = self.axis_scale_offset()  # type: ignore[misc]
        matrix = np.zeros((4, 4))
        matrix[3, 3] = 1.0
        for component, axis in enumerate(self.order):
            matrix[component, axis] = scale[component]
            matrix[component, 3] = offset[component]
        return matrix

    @property
    def from_world(self) -> np.ndarray:
        """4x4 map from LPS mm to this space's coordinates."""
        if self.kind == "world":
            return np.eye(4)
        return self.from_voxel @ np.linalg.inv(self.affine)

    def same_grid(self, other: Space) -> bool:
        return self.shape == other.shape and np.array_equal(self.affine, other.affine)

    def matrix_to(self, other: Space) -> np.ndarray:
        """Exact 4x4 map from this space's coordinates to ``other``'s (same point in both)."""
        if self.same_grid(other):
            return other.from_voxel @ np.linalg.inv(self.from_voxel)
        return other.from_world @ np.linalg.inv(self.from_world)


def _space(kind: str, shape: Sequence[int], affine: np.ndarray | None, components: str) -> Space:
    matrix = np.eye(4) if affine is None else np.array(affine, dtype=np.float64)
    return Space(kind, tuple(int(s) for s in shape), matrix, components)  # type: ignore[arg-type]


def voxel_space(shape: Sequence[int], affine: np.ndarray | None = None) -> Space:
    """Voxel indices ``(i, j, k)`` of a grid (``affine``: voxel -> LPS, default identity)."""
    return _space("voxel", shape, affine, "ijk")


def world_space(shape: Sequence[int], affine: np.ndarray) -> Space:
    """LPS mm over the grid ``(shape, affine)``."""
    return _space("world", shape, affine, "ijk")


def torch_space(
    shape: Sequence[int], align_corners: bool = False, affine: np.ndarray | None = None, components: str = "xyz"
) -> Space:
    """``grid_sample`` coordinates of a grid with either field-of-view convention (default: the
    network matrices' ``align_corners=False``)."""
    return _space("torch_corners" if align_corners else "torch", shape, affine, components)


def centred_space(shape: Sequence[int], affine: np.ndarray | None = None) -> Space:
    """SITReg's centred-normalised coordinates (array order, one scale: ``2 / max(shape)``)."""
    return _space("centred", shape, affine, "ijk")


def space_of_grid(grid, kind: str = "world", **options) -> Space:
    """The ``kind`` space of a :class:`diffusionreg.image.Grid` (its shape and affine)."""
    factories = {"voxel": voxel_space, "world": world_space, "torch": torch_space, "centred": centred_space}
    if kind not in factories:
        raise ValueError(f"space_of_grid kind must be one of {tuple(factories)}, got {kind!r}")
    return factories[kind](grid.shape, affine=grid.affine, **options)


# ----------------------------------------------------------------------------- tensor helpers
# torch is imported inside these functions: this module is also used where torch is absent.


def _points_between(positions, source: Space, target: Space):
    """Map coordinate vectors ``(B, 3, ...)`` from ``source`` to ``target`` (positions' dtype)."""
    import torch

    view = (1, 3) + (1,) * (positions.dim() - 2)
    if source.same_grid(target) and source.kind == "voxel" and target.kind != "world":
        # The common case, written as one scale and offset per component so that it matches
        # grid_sample's own arithmetic term by term.
        scale, offset = target.axis_scale_offset()  # type: ignore[misc]
        gathered = positions[:, list(target.order)]
        scale_t = torch.tensor(scale, dtype=positions.dtype, device=positions.device).view(view)
        offset_t = torch.tensor(offset, dtype=positions.dtype, device=positions.device).view(view)
        return gathered * scale_t + offset_t
    matrix = torch.as_tensor(source.matrix_to(target), dtype=positions.dtype, device=positions.device)
    return torch.einsum("ij,bj...->bi...", matrix[:3, :3], positions) + matrix[:3, 3].view(view)


def coordinates(space: Space, expressed_in: Space | None = None, dtype=None, device=None):
    """Coordinates of every voxel of ``space``'s grid, in ``expressed_in`` (default ``space``):
    ``(1, 3, *space.shape)`` (e.g. where a coarse level's voxels sit on the full grid)."""
    import torch

    axes = [torch.arange(size, dtype=dtype or torch.float32, device=device) for size in space.shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)
    return _points_between(index, voxel_space(space.shape, space.affine), expressed_in or space)


def sample(volume, positions, space: Space | None = None, mode: str = "bilinear", padding_mode: str = "border"):
    """Values of ``volume`` ``(B, C, D0, D1, D2)`` at ``positions`` ``(B, 3, *out)``: ``(B, C, *out)``.

    ``positions`` are coordinates in ``space``, a space of the volume's grid (default: its voxel
    indices, as :mod:`diffusionreg.fields` uses). Interpolation is ``grid_sample``'s
    (``mode`` ``bilinear`` = trilinear, or ``nearest``); ``padding_mode`` ``border`` repeats
    edge values, ``zeros`` treats voxels beyond the grid as 0. The conversion is computed in
    ``positions``' dtype, the sampling in ``volume``'s. This and :func:`sample_affine` are the
    only callers of ``grid_sample`` outside :mod:`diffusionreg.fields`' core.
    """
    import torch.nn.functional as F

    grid_shape = tuple(int(s) for s in volume.shape[2:])
    if space is None:
        space = voxel_space(grid_shape)
    elif space.shape != grid_shape:
        raise ValueError(f"space shape {space.shape} is not the volume's grid {grid_shape}")
    if space.kind in ("torch", "torch_corners") and space.components == "xyz":
        target, normalised = space, positions  # already what grid_sample reads
    else:
        target = torch_space(grid_shape, align_corners=True, affine=space.affine)
        normalised = _points_between(positions, space, target)
    grid = normalised.movedim(1, -1).to(volume.dtype)
    if grid.dim() == 3:  # (B, N, 3) point lists are sampled as a (B, N, 1, 1) grid
        grid = grid[:, :, None, None]
    out = F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=target.kind == "torch_corners")
    return out.reshape(out.shape[:2] + tuple(positions.shape[2:]))


def sample_affine(
    volume, matrix, output: Space, input_space: Space | None = None, mode: str = "bilinear", padding_mode: str = "zeros"
):
    """Resample ``volume`` ``(B, C, *input grid)`` through point maps onto ``output``'s grid.

    ``matrix`` (torch, ``(B, 3 or 4, 4)``, differentiable) maps ``output`` coordinates to
    ``input_space`` coordinates (default: the torch ``align_corners=False`` space of the volume's
    grid); the result at output voxel ``p`` is ``volume(matrix p)``, the ITK resampling direction.
    Both spaces are converted to the network matrices' convention and handed to
    ``affine_grid`` / ``grid_sample`` (float64 matrix algebra, sampling in ``volume``'s dtype).
    """
    import torch
    import torch.nn.functional as F

    input_grid = tuple(int(s) for s in volume.shape[2:])
    if input_space is None:
        input_space = torch_space(input_grid)
    elif input_space.shape != input_grid:
        raise ValueError(f"input space shape {input_space.shape} is not the volume's grid {input_grid}")
    theta = matrix[:, :3, :]
    torch_in = torch_space(input_grid, affine=input_space.affine)
    torch_out = torch_space(output.shape, affine=output.affine)
    if not (_is_torch_space(input_space) and _is_torch_space(output)):
        theta = _as_homogeneous(matrix.to(torch.float64))
        to_input = torch.as_tensor(input_space.matrix_to(torch_in), dtype=torch.float64, device=matrix.device)
        from_output = torch.as_tensor(torch_out.matrix_to(output), dtype=torch.float64, device=matrix.device)
        theta = (to_input @ theta @ from_output)[:, :3, :]
    sampling = F.affine_grid(theta.to(volume.dtype), [volume.shape[0], 1, *output.shape], align_corners=False)
    return F.grid_sample(volume, sampling, mode=mode, padding_mode=padding_mode, align_corners=False)


def _is_torch_space(space: Space) -> bool:
    return space.kind == "torch" and space.components == "xyz"


def _as_homogeneous(matrix):
    import torch

    if matrix.shape[-2] == 4:
        return matrix
    bottom = torch.zeros(*matrix.shape[:-2], 1, 4, dtype=matrix.dtype, device=matrix.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([matrix, bottom], dim=-2)


def rescale_displacement(u, source: Space, target: Space):
    """Displacements ``(B, 3, ...)`` in ``source`` units and component order -> ``target``'s.

    Vectors transform by the linear part of :meth:`Space.matrix_to` only (no offset).
    """
    import torch

    linear = source.matrix_to(target)[:3, :3]
    permutation = np.abs(linear) > 0
    view = (1, 3) + (1,) * (u.dim() - 2)
    if np.all(permutation.sum(axis=1) == 1):  # a scaled permutation: one factor per component
        sources = permutation.argmax(axis=1)
        factors = torch.tensor(linear[np.arange(3), sources], dtype=u.dtype, device=u.device).view(view)
        return u[:, list(sources)] * factors
    return torch.einsum("ij,bj...->bi...", torch.as_tensor(linear, dtype=u.dtype, device=u.device), u)
