"""World-space affine registration with a spatial-diffusion model.

Chain (all matrices exact, 4x4, LPS mm):

    T_world = G_mov N^-1 C N G_fix^-1

G_fix, G_mov: voxel -> LPS matrices of the fixed / moving network grids (``network_grid``: the
config's shape and per-axis spacing, centred on the
fixed / moving intensity centroid for 'moments', on the image centres for 'center', both on the
fixed centre for 'none'; identity direction, except that a pose-search start (pose_search.py)
turns the moving grid by its rotation and shifts it by its translation); N: voxel -> torch-normalised
(align_corners=False); C: the composed reverse-process matrix (fixed normalised -> moving
normalised). T_world maps fixed points to moving points (ITK resampling convention).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffusionreg.errors import InputError
from diffusionreg.image import Image, check_registrable
from diffusionreg.spaces import world_transform_from_normalized
from diffusionreg.transforms import AffineTransform

from .config import AffineConfig, RefineConfig
from .network import AffineDiffusionNet
from .pose_search import Pose, Scorer, search_poses
from .preprocess import foreground_centroid, network_filter, network_grid, network_window, to_network
from .refine import refine_affine, unit_intensities
from .reverse import bidirectional as run_bidirectional
from .reverse import reverse_process, step_plan
from .schedule import Schedule


@dataclass
class LoadedModel:
    name: str
    net: AffineDiffusionNet
    cfg: AffineConfig
    sched: Schedule
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def build_model(
    cfg: AffineConfig, state: dict | None = None, name: str = "model", device: str | torch.device = "cpu"
) -> LoadedModel:
    net = AffineDiffusionNet(cfg)
    if state is not None:
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(
                f"model {name}: weights do not match its config (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
            )
    net.eval().to(device)
    return LoadedModel(name, net, cfg, Schedule.from_config(cfg), torch.device(device))


def load_model(name_or_path=None, modality: str = "mri", device="cpu") -> LoadedModel:
    """Registered name, path or None (the default model for ``modality``); sha256 checked."""
    from diffusionreg import models

    entry = models.resolve(name_or_path, "affine", modality)
    state = models.load_state_dict(entry)
    cfg = AffineConfig.from_dict(models.load_config_json(entry))
    return build_model(cfg, state, entry.name, device)


@dataclass
class AffineResult:
    transform: AffineTransform  # fixed LPS -> moving LPS
    theta: np.ndarray  # 4x4 normalised (fixed net grid -> moving net grid)
    fixed_grid_affine: np.ndarray
    moving_grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    seconds: float
    unidirectional: AffineTransform | None = None
    diffusion_only: AffineTransform | None = None  # before the optional refinement
    refine_score: tuple[float, float] | None = None  # similarity before/after refinement
    similarity: float = float("nan")  # final normalised mutual information (inference.similarity)
    doubt: str | None = None  # why the result is doubtful; None when it is not
    starts: list[dict] = field(default_factory=list)  # each start run: search score, similarity, rotation
    search_seconds: float = 0.0  # wall time of the pose search (0 when off)

    @property
    def doubtful(self) -> bool:
        return self.doubt is not None

    def to_dict(self) -> dict:
        d = {
            "matrix_lps": self.transform.matrix.tolist(),
            "theta_normalized": self.theta.tolist(),
            "fixed_network_grid": self.fixed_grid_affine.tolist(),
            "moving_network_grid": self.moving_grid_affine.tolist(),
            "grid_shape": list(self.grid_shape),
            "seconds": self.seconds,
            "similarity_nmi": self.similarity,
            "doubtful": self.doubtful,
            "starts": self.starts,
            "search_seconds": self.search_seconds,
        }
        if self.doubt is not None:
            d["doubt_reason"] = self.doubt
        if self.unidirectional is not None:
            d["matrix_lps_unidirectional"] = self.unidirectional.matrix.tolist()
        return d


def _check_image(image: Image, what: str, cfg: AffineConfig, modality: str) -> tuple[float, float]:
    """The shared registration input check, then the intensity window of the image."""
    check_registrable(image, what)
    return network_window(image.array, cfg, modality)


def centres(fixed: Image, moving: Image, initialize: str, windows) -> tuple[np.ndarray, np.ndarray]:
    """World centres (LPS) of the fixed and moving network grids."""
    if initialize == "moments":
        return foreground_centroid(fixed, windows[0]), foreground_centroid(moving, windows[1])
    if initialize == "center":
        return fixed.grid.centre_world(), moving.grid.centre_world()
    if initialize == "none":
        c = fixed.grid.centre_world()
        return c, c
    raise InputError(f"unknown initialisation {initialize!r}; use moments, center or none")


def register_affine(
    fixed: Image,
    moving: Image,
    model: LoadedModel,
    modality: str = "mri",
    steps: int | None = None,
    bidirectional: bool | None = None,
    initialize: str | None = None,
    seed: int = 0,
    progress=None,
    refine: RefineConfig | None = None,
    refine_iterations: int | None = None,
    pose_search: bool | None = None,
) -> AffineResult:
    """Register ``moving`` onto ``fixed``; returns the fixed->moving LPS AffineTransform.

    Every option left at None takes the model's default (``model.cfg.inference``, from its
    config.json), exactly as ``diffusionreg affine`` does. ``refine`` replaces the refinement
    settings (see :mod:`diffusionreg.affine.refine`; no levels runs the method as published;
    either way as they apply to ``modality``: ``RefineConfig.for_modality``),
    ``refine_iterations`` sets the Adam steps per refinement level (0: no refinement),
    ``pose_search`` turns the any-pose start on or off (:mod:`diffusionreg.affine.pose_search`;
    off with no refinement is the published method). The result carries the final normalised
    mutual information and, below the model's threshold for ``modality`` (``inference.similarity``), a doubt.
    """
    start = time.perf_counter()
    cfg = model.cfg
    defaults = cfg.inference
    steps = defaults.steps if steps is None else steps
    bidirectional = defaults.bidirectional if bidirectional is None else bidirectional
    initialize = defaults.initialize if initialize is None else initialize
    refine = (defaults.refine if refine is None else refine).for_modality(modality)
    search = defaults.pose_search.enabled if pose_search is None else bool(pose_search)
    if refine_iterations is not None:
        if refine_iterations < 0:
            raise InputError(f"refine_iterations must be >= 0, got {refine_iterations}")
        refine = refine.with_iterations(refine_iterations)
    w_fix = _check_image(fixed, "fixed image", cfg, modality)
    w_mov = _check_image(moving, "moving image", cfg, modality)
    c_fix, c_mov = centres(fixed, moving, initialize, (w_fix, w_mov))
    check = defaults.similarity
    fixed_unit, moving_unit = unit_intensities(fixed), unit_intensities(moving)
    similarity = Scorer(fixed_unit, moving_unit, c_fix, check.spacing_mm, check.histogram_bins, check.max_field_of_view_mm)
    search_start = time.perf_counter()
    if search:
        settings = defaults.pose_search
        with progress.stage("pose search", total=1 + settings.polish) if progress else _no_stage() as search_stage:
            poses = search_poses(fixed_unit, moving_unit, c_fix, c_mov, settings, search_stage)
    else:
        poses = [Pose(np.eye(3), np.zeros(3), float("nan"))]
    search_seconds = time.perf_counter() - search_start if search else 0.0
    run = dict(model=model, modality=modality, steps=steps, bidirectional=bidirectional, refine=refine, progress=progress)
    best: AffineResult | None = None
    tried = []
    for index, pose in enumerate(poses):
        # A further start only when the search could not tell it from the best one, or when the
        # best result so far is doubtful: a start that is already good costs one run.
        if index > 0 and pose.score < poses[0].score - defaults.pose_search.runner_up_margin and not best.doubtful:
            break
        torch.manual_seed(seed)
        # With the search on, the diffusion's answer is kept only when it scores at least as well as
        # the start it came from (a start outside the network's training range can be made worse).
        keep_better = similarity if search else None
        result = _register_from(fixed, moving, pose, c_fix, c_mov, initialize, (w_fix, w_mov), keep_better=keep_better, **run)
        result.similarity = float(similarity(result.transform.matrix[None])[0])
        searched = pose.score if np.isfinite(pose.score) else None  # None: no search (JSON has no NaN)
        tried.append({"search_score": searched, "similarity": result.similarity, "rotation": pose.rotation.tolist()})
        threshold = check.threshold(modality)
        if threshold is not None and result.similarity < threshold:
            result.doubt = (
                f"normalised mutual information after registration {result.similarity:.3f} is below "
                f"{threshold:.3f} (the {modality} threshold of inference.similarity); the images may not overlap in "
                "content or the alignment failed"
            )
        if best is None or result.similarity > best.similarity:
            best = result
    best.starts = tried
    best.search_seconds = search_seconds
    best.seconds = time.perf_counter() - start
    return best


def _register_from(
    fixed: Image,
    moving: Image,
    pose: Pose,
    c_fix: np.ndarray,
    c_mov: np.ndarray,
    initialize: str,
    windows,
    model: LoadedModel,
    modality: str,
    steps: int | None,
    bidirectional: bool,
    refine: RefineConfig,
    progress,
    keep_better: Scorer | None = None,
) -> AffineResult:
    """The diffusion (and refinement) from a starting ``pose``: the moving network grid is centred
    on ``c_mov + pose.translation`` with direction ``pose.rotation``, so the network sees the moving
    image turned into the fixed frame; the chain to LPS stays exact (module docstring). With
    ``keep_better``, the refinement starts from whichever of the start pose and the diffusion's
    answer that scorer rates higher."""
    cfg = model.cfg
    g_fix = network_grid(cfg, c_fix)
    g_mov = network_grid(cfg, c_mov + pose.translation, direction=pose.rotation)
    f_in = to_network(fixed, g_fix, cfg, windows[0], modality)
    m_in = to_network(moving, g_mov, cfg, windows[1], modality)
    dev = model.device
    f_t = torch.from_numpy(f_in.array)[None, None].to(dev)
    m_t = torch.from_numpy(m_in.array)[None, None].to(dev)
    cls = None
    if cfg.n_classes > 1:
        cls = torch.tensor([cfg.class_index(modality)], dtype=torch.long, device=dev)
    prep = network_filter(modality)
    n_steps = len(step_plan(model.sched, steps))
    stage = progress.stage("affine", total=n_steps * (2 if bidirectional else 1)) if progress else None
    cb = (lambda n: stage.update()) if stage is not None else None
    uni = None
    try:
        if bidirectional:
            comp, _, c1 = run_bidirectional(model.net, f_t, m_t, model.sched, steps, cls, prep, callback=cb)
            uni = c1[0].numpy()
        else:
            comp, _ = reverse_process(model.net, f_t, m_t, model.sched, steps, cls, prep, callback=cb)
    finally:
        if stage is not None:
            stage.__exit__(None, None, None)
    theta = comp[0].numpy()
    shape = cfg.grid_shape

    def world(th):
        return AffineTransform(world_transform_from_normalized(th, g_fix.affine, shape, g_mov.affine, shape))

    diffusion = world(theta)
    initial = diffusion
    if keep_better is not None:
        start_pose = pose.matrix(c_fix, c_mov)
        scores = keep_better(np.stack([start_pose, diffusion.matrix]))
        if scores[0] > scores[1]:
            initial = AffineTransform(start_pose)
    final, score = initial, None
    if refine is not None and refine.levels:
        pivot = c_fix if initialize == "moments" else foreground_centroid(fixed, windows[0])
        with progress.stage("refine", total=1) if progress else _no_stage() as refine_stage:
            refined = refine_affine(fixed, moving, initial, pivot, refine, device=dev)
            if refine_stage is not None:
                refine_stage.update(message=f"{refine.metric.upper()} {refined.score_before:.3f} -> {refined.score_after:.3f}")
        final, score = refined.transform, (refined.score_before, refined.score_after)
    return AffineResult(
        final,
        theta,
        g_fix.affine,
        g_mov.affine,
        shape,
        0.0,
        world(uni) if uni is not None else None,
        diffusion_only=diffusion,
        refine_score=score,
    )


@contextlib.contextmanager
def _no_stage():
    yield None
