"""Dense displacement fields in torch: warping, composition, exponentiation, inversion, Jacobians.

Conventions (see ``docs/conventions.md``):

* A field ``u`` is a tensor ``(B, 3, D0, D1, D2)`` in **voxel units of its own grid**; component
  ``c`` is the displacement along array axis ``c``. It represents the map
  ``phi(x) = x + u(x)`` where ``x`` is a voxel index (voxel centres at integers).
* Warping a volume by ``u`` evaluates ``volume(phi(x))`` (pull-back, the ITK resampling
  direction), so ``u`` maps points of the output (fixed) grid to points of the input (moving)
  grid, both grids sharing one index space.
* Between sample points fields and volumes are trilinear; outside the grid they are
  extended as asked (``padding_mode``); displacements are always extended by their border value.
* Sampling goes through :func:`diffusionreg.spaces.sample` (voxel positions in, no
  normalisation written here).

Everything is device- and dtype-agnostic: results live on the device and dtype of the inputs.
Tensors of the wrong shape, type or batch and unknown modes break a function's contract and
raise ``ValueError`` (a caller's bug); a field too thin to differentiate is bad input
(:class:`~diffusionreg.errors.InputError`), as it can come from a user's file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from diffusionreg import spaces
from diffusionreg.errors import InputError

__all__ = [
    "identity_grid",
    "warp",
    "compose",
    "exp_velocity",
    "invert",
    "jacobian_determinant",
    "non_diffeomorphic_volume_map",
    "non_diffeomorphic_volume",
    "NonDiffeomorphicVolume",
    "inverse_consistency_error",
    "resize_field",
]

SPATIAL_DIMS = 3
WARP_MODES = ("bilinear", "nearest")
PADDING_MODES = ("border", "zeros")


# ----------------------------------------------------------------------------- validation


def _check_field(u: torch.Tensor, name: str = "u") -> None:
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(u).__name__}")
    if u.dim() != 2 + SPATIAL_DIMS or u.shape[1] != SPATIAL_DIMS:
        raise ValueError(f"{name} must have shape (B, 3, D0, D1, D2), got {tuple(u.shape)}")
    if not u.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {u.dtype}")


def _check_same_grid(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape[2:] != b.shape[2:]:
        raise ValueError(f"{names} are on different grids: {tuple(a.shape[2:])} vs {tuple(b.shape[2:])}")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"{names} have incompatible batch sizes {a.shape[0]} and {b.shape[0]}")


def _broadcast_batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand a batch of one to the other's batch size (views, no copies)."""
    batch = max(a.shape[0], b.shape[0])
    return a.expand(batch, *a.shape[1:]), b.expand(batch, *b.shape[1:])


# ----------------------------------------------------------------------------- grids and warping


def identity_grid(
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Voxel coordinates of a grid as a ``(1, 3, D0, D1, D2)`` tensor: ``grid[0, c] = index along axis c``."""
    if len(shape) != SPATIAL_DIMS or any(int(s) < 1 for s in shape):
        raise ValueError(f"expected a 3D grid shape of positive sizes, got {tuple(shape)}")
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def warp(
    volume: torch.Tensor,
    u: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Resample ``volume`` at ``phi(x) = x + u(x)``: returns ``volume(phi(x))`` on the grid of ``u``.

    ``volume`` is ``(B, C, D0, D1, D2)`` on the same grid as ``u`` (a batch of 1 on either side
    broadcasts). ``mode``: ``"bilinear"`` (trilinear) or ``"nearest"``. ``padding_mode``:
    ``"border"`` repeats the edge values outside the grid, ``"zeros"`` fades to zero over the
    half voxel beyond the outer voxel centres and is zero further out.
    Integer volumes (label maps) need ``mode="nearest"`` and keep their dtype.
    """
    _check_field(u)
    if not isinstance(volume, torch.Tensor) or volume.dim() != 2 + SPATIAL_DIMS:
        raise ValueError(f"volume must be a (B, C, D0, D1, D2) tensor, got {getattr(volume, 'shape', type(volume))}")
    if mode not in WARP_MODES:
        raise ValueError(f"warp mode must be one of {WARP_MODES}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    _check_same_grid(volume, u, "volume and displacement")
    integer_input = not volume.is_floating_point()
    if integer_input and mode != "nearest":
        raise ValueError(f"an integer volume ({volume.dtype}) can only be warped with mode='nearest'")
    # grid_sample wants one dtype: the wider of the two floats (labels take the field's).
    dtype = u.dtype if integer_input else torch.promote_types(volume.dtype, u.dtype)
    volume_values, u = _broadcast_batch(volume.to(dtype), u.to(dtype))
    positions = identity_grid(u.shape[2:], device=u.device, dtype=u.dtype) + u
    warped = spaces.sample(volume_values, positions, mode=mode, padding_mode=padding_mode)
    if integer_input:
        # Nearest sampling returns stored values exactly; rounding only guards the cast.
        return warped.round().to(volume.dtype)
    return warped


def compose(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Field of ``phi_a ∘ phi_b``: ``x -> phi_a(phi_b(x))``, i.e. ``u_b(x) + u_a(x + u_b(x))``.

    ``phi_b`` is applied first (ITK order for a list ``[a, b]``). ``u_a`` is interpolated
    trilinearly and extended by its border values outside the grid.
    """
    _check_field(u_a, "u_a")
    _check_field(u_b, "u_b")
    _check_same_grid(u_a, u_b, "u_a and u_b")
    return u_b + warp(u_a, u_b, mode="bilinear", padding_mode="border")


def exp_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the time-1 flow of a stationary velocity field ``v`` (voxels per unit time).

    Scaling and squaring: ``u = v / 2**steps``, then ``steps`` times ``u <- compose(u, u)``.
    """
    _check_field(v, "v")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    u = v / (2.0**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


# ----------------------------------------------------------------------------- fixed points


def vector_length(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Euclidean length of the vectors of ``x`` along ``dim`` (the components axis of a field).

    ``torch.linalg.vector_norm`` over a non-innermost axis takes a slow path on CPUs (~30x
    slower on a ``(2, 3, 64, 80, 64)`` field in torch 2.x); the sum of squares is one pass.
    For measurements and convergence checks only: its gradient at a zero vector is NaN (sqrt at
    0), where ``vector_norm`` gives the zero subgradient a loss needs."""
    return x.square().sum(dim).sqrt()


def _voxel_norm_max(x: torch.Tensor) -> torch.Tensor:
    """Per batch element, the largest Euclidean norm of the 3-vectors of ``x`` ``(B, 3, ...)``: ``(B,)``."""
    return vector_length(x).flatten(1).amax(dim=1)


def _batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per batch element inner product of two ``(B, ...)`` tensors, in float64: ``(B,)``."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1)).to(torch.float64)


@dataclass(frozen=True)
class _FixedPointSettings:
    max_iterations: int
    memory: int
    # Ridge added to the Anderson normal equations, relative to their mean diagonal, so that
    # nearly collinear residual differences (close to convergence) do not blow the step up.
    regularisation: float


def _anderson_solve(
    fixed_point_map: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    threshold: torch.Tensor,
    settings: _FixedPointSettings,
) -> torch.Tensor:
    """Solve ``x = G(x)`` for a batch ``(B, ...)`` by Anderson-accelerated fixed-point iteration.

    Type-II Anderson mixing in difference form with full mixing (beta = 1), solved per batch
    element. Stops when every element's residual ``G(x) - x`` has a largest voxel norm
    ``<= threshold`` (``(B,)``) or after ``settings.max_iterations`` evaluations of ``G``;
    returns the iterate whose residual passed the test, or the latest iterate at the cap.
    """
    residual_differences: list[torch.Tensor] = []
    value_differences: list[torch.Tensor] = []
    gram = torch.zeros(x.shape[0], 0, 0, dtype=torch.float64, device=x.device)
    previous_value: torch.Tensor | None = None
    previous_residual: torch.Tensor | None = None
    for _ in range(settings.max_iterations):
        value = fixed_point_map(x)
        residual = value - x
        if bool((_voxel_norm_max(residual) <= threshold).all()):
            return x
        if settings.memory > 0 and previous_value is not None:
            new_difference = residual - previous_residual
            if len(residual_differences) == settings.memory:
                residual_differences.pop(0)
                value_differences.pop(0)
                gram = gram[:, 1:, 1:]
            cross = torch.stack(
                [_batched_dot(old, new_difference) for old in residual_differences]
                + [_batched_dot(new_difference, new_difference)],
                dim=1,
            )
            size = gram.shape[1] + 1
            grown = torch.zeros(x.shape[0], size, size, dtype=torch.float64, device=x.device)
            grown[:, :-1, :-1] = gram
            grown[:, -1, :] = cross
            grown[:, :, -1] = cross
            gram = grown
            residual_differences.append(new_difference)
            value_differences.append(value - previous_value)
        previous_value, previous_residual = value, residual
        if residual_differences:
            # gamma = argmin || residual - sum_j gamma_j dF_j ||, then x <- G(x) - sum_j gamma_j dG_j.
            rhs = torch.stack([_batched_dot(d, residual) for d in residual_differences], dim=1)
            # The floor keeps the system solvable for an element whose residual stopped changing.
            ridge_value = (settings.regularisation * gram.diagonal(dim1=1, dim2=2).mean(dim=1)).clamp_min(
                torch.finfo(torch.float64).tiny
            )
            ridge = ridge_value[:, None, None] * torch.eye(gram.shape[1], dtype=torch.float64, device=x.device)
            gamma = torch.linalg.solve(gram + ridge, rhs.unsqueeze(-1)).squeeze(-1).to(x.dtype)
            x = value.clone()
            broadcast = (-1,) + (1,) * (x.dim() - 1)
            for j, difference in enumerate(value_differences):
                x -= gamma[:, j].view(broadcast) * difference
        else:
            x = value
    return x


def _negated_pullback(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The inversion map ``G(w)(x) = -u(x + w(x))``; its fixed point is the inverse's displacement."""
    return -warp(u, w, mode="bilinear", padding_mode="border")


class _InvertFunction(torch.autograd.Function):
    """Fixed-point inversion with an implicit-function backward (memory independent of iterations)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        u: torch.Tensor,
        tolerance: float,
        forward_settings: _FixedPointSettings,
        backward_tolerance: float,
        backward_settings: _FixedPointSettings,
    ) -> torch.Tensor:
        threshold = torch.full((u.shape[0],), float(tolerance), dtype=u.dtype, device=u.device)
        # Start from the first-order inverse -u: exact for translations, close for small fields.
        w = _anderson_solve(lambda w_: _negated_pullback(u, w_), -u, threshold, forward_settings)
        ctx.save_for_backward(u, w)
        ctx.backward_tolerance = backward_tolerance
        ctx.backward_settings = backward_settings
        return w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w: torch.Tensor):  # type: ignore[override]
        u, w = ctx.saved_tensors
        # At the fixed point w* = G(w*, u):  dw* = (I - dG/dw)^-1 dG/du du, hence
        # dL/du = (dG/du)^T y with the adjoint y solving y = grad_w + (dG/dw)^T y.
        with torch.enable_grad():
            u_leaf = u.detach().requires_grad_(True)
            w_leaf = w.detach().requires_grad_(True)
            g = _negated_pullback(u_leaf, w_leaf)

        def adjoint_map(y: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(g, w_leaf, y, retain_graph=True)
            return grad_w + vjp

        threshold = ctx.backward_tolerance * _voxel_norm_max(grad_w)
        y = _anderson_solve(adjoint_map, grad_w.clone(), threshold, ctx.backward_settings)
        (grad_u,) = torch.autograd.grad(g, u_leaf, y)
        return grad_u, None, None, None, None


def invert(
    u: torch.Tensor,
    max_iterations: int = 100,
    tolerance: float = 0.01,
    anderson_memory: int = 4,
    backward_max_iterations: int = 100,
    backward_tolerance: float = 1e-4,
    anderson_regularisation: float = 1e-6,
) -> torch.Tensor:
    """Displacement ``w`` of the inverse map: ``phi_w = phi_u^-1`` on the grid of ``u``.

    Solves ``w(x) = -u(x + w(x))`` (so that ``phi_u(phi_w(x)) = x``) by fixed-point iteration
    from ``w = -u`` with Anderson acceleration (``anderson_memory`` past residuals; 0 gives the
    plain iteration). Stops when the largest per-voxel residual ``|w + u(x + w)|`` (voxels),
    i.e. the inverse-consistency error ``|phi_u(phi_w(x)) - x|``, is ``<= tolerance`` for every
    batch element, or after ``max_iterations`` evaluations; at the cap the last iterate is
    returned without error (measure ``compose(u, w)`` if a certificate is needed).
    ``u`` is extended by its border values where ``x + w`` leaves the grid.

    Differentiable: the backward pass uses implicit differentiation at the fixed point and
    solves the adjoint system ``y = g + (dG/dw)^T y`` by the same accelerated iteration,
    stopping when its residual is ``<= backward_tolerance`` times the largest voxel norm of the
    incoming gradient, so memory does not grow with the number of iterations.
    The plain iteration converges where ``w -> -u(x + w)`` contracts (``|grad u| < 1`` along the
    way); Anderson mixing speeds it up and widens that somewhat. A folded ``u`` has no inverse:
    expect the cap to be reached and a large residual there.
    """
    _check_field(u)
    if max_iterations < 1 or backward_max_iterations < 1:
        raise ValueError("max_iterations and backward_max_iterations must be >= 1")
    if tolerance < 0 or backward_tolerance < 0 or anderson_memory < 0 or anderson_regularisation < 0:
        raise ValueError("tolerances, anderson_memory and anderson_regularisation must be >= 0")
    forward_settings = _FixedPointSettings(int(max_iterations), int(anderson_memory), float(anderson_regularisation))
    backward_settings = _FixedPointSettings(int(backward_max_iterations), int(anderson_memory), float(anderson_regularisation))
    return _InvertFunction.apply(u, float(tolerance), forward_settings, float(backward_tolerance), backward_settings)


# ----------------------------------------------------------------------------- Jacobians


def _det3(m: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Determinant of a 3x3 matrix given as nested lists of equally shaped tensors ``m[row][col]``."""
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``phi = x + u`` at every voxel: ``(B, D0, D1, D2)``, unitless.

    Derivatives along each array axis by central differences in the interior and one-sided
    first-order differences on the first and last slice (``torch.gradient``), in voxel units,
    so the determinant is the local volume ratio. Needs at least 2 voxels along each axis.
    """
    _check_field(u)
    if min(u.shape[2:]) < 2:
        raise InputError(f"the Jacobian needs at least 2 voxels along each axis, got {tuple(u.shape[2:])}")
    # derivatives[a][:, c] = d u_c / d x_a
    derivatives = torch.gradient(u, dim=(2, 3, 4))
    jacobian = [
        [derivatives[axis][:, component] + (1.0 if axis == component else 0.0) for axis in range(SPATIAL_DIMS)]
        for component in range(SPATIAL_DIMS)
    ]
    return _det3(jacobian)


# Offsets of the neighbours spanning the two central tetrahedra of Liu et al.: the even-parity
# tetrahedron of the cube [x - 1, x] (seen from its top corner x) and of the cube [x, x + 1]
# (seen from its bottom corner x). Their order makes the determinant +2 for the identity.
_CENTRAL_TETRAHEDRA = (
    ((-1, -1, 0), (-1, 0, -1), (0, -1, -1)),
    ((1, 1, 0), (0, 1, 1), (1, 0, 1)),
)
# A tetrahedron with edge matrix E has volume |det E| / 6 (voxels).
_TETRAHEDRON_VOLUME_FACTOR = 1.0 / 6.0
# The 8 corner and 2 central tetrahedra of all voxels tile every cube twice (both 5-tetrahedra
# decompositions), so each volume is counted twice.
_DOUBLE_COVER_FACTOR = 0.5


def non_diffeomorphic_volume_map(u: torch.Tensor) -> torch.Tensor:
    """Per-voxel non-diffeomorphic volume (voxels) of ``phi = x + u``: ``(B, D0, D1, D2)``.

    Liu et al., "On finite difference Jacobian computation in deformable image registration",
    IJCV 2024 (the NDV of the LUMIR evaluation). At every voxel ten finite-difference Jacobians
    are formed: the 8 combinations of forward/backward differences along the three axes (the
    8 corner tetrahedra around x) and the 2 central tetrahedra of the cubes ``[x-1, x]`` and
    ``[x, x+1]`` (diagonal differences). The map is ``0.5 * sum_t max(-det J_t, 0) / 6``: the
    total volume of the tetrahedra that the transform turns inside out, halved because the
    tetrahedra of all voxels cover space twice. Outside the grid the displacement is extended
    by its border value (one-sided differences leaving the grid see the identity).
    For a linear map ``A`` with ``det A < 0`` every interior voxel scores ``|det A|``.
    """
    _check_field(u)
    sizes = u.shape[2:]
    padded = F.pad(u, (1, 1) * SPATIAL_DIMS, mode="replicate")

    def shifted(offset: Sequence[int]) -> list[torch.Tensor]:
        # phi(x + offset) - x, i.e. u(x + offset) + offset, on the unpadded grid
        window = padded[
            :,
            :,
            1 + offset[0] : 1 + offset[0] + sizes[0],
            1 + offset[1] : 1 + offset[1] + sizes[1],
            1 + offset[2] : 1 + offset[2] + sizes[2],
        ]
        return [window[:, c] + float(offset[c]) for c in range(SPATIAL_DIMS)]

    centre = shifted((0, 0, 0))

    def unit(axis: int, sign: int) -> tuple[int, int, int]:
        offset = [0, 0, 0]
        offset[axis] = sign
        return tuple(offset)  # type: ignore[return-value]

    def difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
        return [a[c] - b[c] for c in range(SPATIAL_DIMS)]

    forward_diffs = [difference(shifted(unit(axis, 1)), centre) for axis in range(SPATIAL_DIMS)]
    backward_diffs = [difference(centre, shifted(unit(axis, -1))) for axis in range(SPATIAL_DIMS)]

    def negative_part(columns: Sequence[list[torch.Tensor]]) -> torch.Tensor:
        # columns[a][c]: component c of the a-th edge; det is transpose-invariant.
        return torch.clamp(-_det3(columns), min=0.0)

    total = torch.zeros_like(centre[0])
    for signs in range(2**SPATIAL_DIMS):
        columns = [(backward_diffs if (signs >> axis) & 1 else forward_diffs)[axis] for axis in range(SPATIAL_DIMS)]
        total = total + negative_part(columns)
    for tetrahedron in _CENTRAL_TETRAHEDRA:
        total = total + negative_part([difference(shifted(offset), centre) for offset in tetrahedron])
    return _DOUBLE_COVER_FACTOR * _TETRAHEDRON_VOLUME_FACTOR * total


@dataclass(frozen=True)
class NonDiffeomorphicVolume:
    """NDV per batch element: ``volume_voxels`` (voxels) and ``fraction`` of the counted voxels (0..1)."""

    volume_voxels: torch.Tensor
    fraction: torch.Tensor


def non_diffeomorphic_volume(u: torch.Tensor, mask: torch.Tensor | None = None) -> NonDiffeomorphicVolume:
    """Total non-diffeomorphic volume of ``phi = x + u`` (see :func:`non_diffeomorphic_volume_map`).

    ``mask`` (``(B or 1, D0, D1, D2)``, nonzero = counted) restricts both the sum and the
    denominator of the fraction, as the LUMIR evaluation does with a brain mask. Multiply the
    fraction by 100 for the percentage reported by LUMIR.
    """
    ndv_map = non_diffeomorphic_volume_map(u)
    if mask is None:
        weights = torch.ones_like(ndv_map[:1])
    else:
        if mask.dim() != 1 + SPATIAL_DIMS or mask.shape[1:] != ndv_map.shape[1:]:
            grid = ", ".join(str(size) for size in ndv_map.shape[1:])
            raise ValueError(f"mask must have shape (B, {grid}), got {tuple(mask.shape)}")
        weights = (mask != 0).to(device=ndv_map.device, dtype=ndv_map.dtype)
    volume = (ndv_map * weights).flatten(1).sum(dim=1)
    counted = weights.expand_as(ndv_map).flatten(1).sum(dim=1)
    return NonDiffeomorphicVolume(volume_voxels=volume, fraction=volume / counted)


# ----------------------------------------------------------------------------- consistency, resizing


def inverse_consistency_error(
    u_forward: torch.Tensor,
    u_inverse: torch.Tensor,
    spacing: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """``|phi_f(phi_i(x)) - x|`` in mm at every voxel: ``(B, D0, D1, D2)``.

    Both fields on one grid, ``spacing`` its ``(3,)`` voxel size in mm along array axes
    ``(i, j, k)``. Distances use the spacing only, which is exact for orthonormal direction
    cosines (any rotation of the grid leaves lengths unchanged).
    """
    residual = compose(u_forward, u_inverse)
    spacing_tensor = torch.as_tensor(spacing, dtype=residual.dtype, device=residual.device).reshape(-1)
    if spacing_tensor.numel() != SPATIAL_DIMS or bool((spacing_tensor <= 0).any()):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}")
    return vector_length(residual * spacing_tensor.view(1, SPATIAL_DIMS, 1, 1, 1))


def resize_field(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a field to a grid of ``shape`` covering the same field of view, in the new voxel units.

    The grids share their outer voxel *faces* (the ``align_corners=False`` convention of the
    network grids and :mod:`diffusionreg.spaces`): a new index ``y`` sits at old index
    ``(y + 0.5) * old / new - 0.5``. Values are interpolated trilinearly (no anti-aliasing when
    shrinking) and component ``c`` is multiplied by ``new_c / old_c``.
    """
    _check_field(u)
    shape = tuple(int(s) for s in shape)
    if len(shape) != SPATIAL_DIMS or min(shape) < 1:
        raise ValueError(f"expected a 3D grid shape of positive sizes, got {shape}")
    if shape == tuple(u.shape[2:]):
        return u
    resized = F.interpolate(u, size=shape, mode="trilinear", align_corners=False)
    factors = torch.tensor([new / old for new, old in zip(shape, u.shape[2:])], dtype=u.dtype, device=u.device).view(
        1, SPATIAL_DIMS, 1, 1, 1
    )
    return resized * factors
