"""Affine benchmark: spatial diffusion vs ANTs affine vs SimpleITK (Mattes MI), same run.

Real pairs (Dice of shared deep structures through the estimated transform, labels warped
nearest-neighbour onto the fixed grid) among the labelled brains of ../shared/data/brain,
including a pair whose moving image is rotated 25 deg about an oblique axis (a header-only
rotation, exact for image and labels); plus synthetic known-affine recoveries on the
held-out subject oasis_B (never used in training): rotation up to 30 deg about a random
axis, translation up to 20 mm, per-axis scale 0.85-1.15, with a bias field, noise and a
field-of-view cut. Recovery error = mean |T_est(x) - T_true(x)| (mm) over brain voxels;
failure = error > 2 mm. Every method runs with the same thread count.

    .venv/bin/python bench/affine.py --threads 1 [--methods ours,ants,sitk] [--synthetic 10]

Pose sweep (issue 16, ``--pose-sweep``): each subject of ``--pose-subjects`` moved by a rotation of
each angle of ``--pose-angles`` about an oblique axis (one random axis per subject and angle),
a 10-30 mm translation and a per-axis scale of 0.9-1.1, with the same bias field, noise and
field-of-view cut as the synthetic cases; error and failure as above. Written to
bench/out/affine_pose.md (and the per-case JSON beside it).

    .venv/bin/python bench/affine.py --threads 1 --real none --synthetic 0 --pose-sweep \
        --methods ours-default,ants,sitk

Head CT against the CT template (issue 16, ``--ct-template-set``): the cadaver CT and the GE series
(``--ct-template-subjects``), as stored and rotated by each of ``--ct-template-angles`` about an
oblique axis, registered onto the midline pipeline's pose template (the 2 mm SCCT head); no truth,
so each result is scored by Mattes mutual information and normalised cross-correlation over the
template's head mask (:func:`template_similarity`, one function for every method) and by how far
the methods' results lie from each other (:func:`agreement_mm`). Written to
bench/out/affine_ct-template.md / .json (per-method caches affine_ct-template_<method>.json).

    nice -n 10 .venv/bin/python bench/affine.py --threads 1 --ct-template-set --model head-ct \
        --modality ct --methods none,ours-default,ants,sitk,midline-pose [--ct-template-angles 0,45,90,135]

Writes bench/out/affine.md, bench/out/affine.json and bench/out/affine_overlay.png.
Results of each method are cached in bench/out/affine_<method>.json; ``--reuse`` keeps the
cached results of methods not listed in --methods. ``--variant NAME`` (e.g. another --model or
--modality) caches the methods it runs as affine_<method>-NAME.json, beside the defaults' caches,
and writes affine-NAME.md / .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusionreg.spaces import centred_affine, rotation_about_axis

OUT = ROOT / "bench" / "out"

# Shared deep structures: name -> labels per label map.
ASEG = {
    "thalamus": [10, 49],
    "caudate": [11, 50],
    "putamen": [12, 51],
    "pallidum": [13, 52],
    "hippocampus": [17, 53],
    "amygdala": [18, 54],
    "lateral ventricle": [4, 43],
    "brainstem": [16],
    "cerebellum": [7, 8, 46, 47],
    "3rd ventricle": [14],
    "4th ventricle": [15],
}
SEG13 = {
    "thalamus": [1],
    "caudate": [6],
    "putamen": [5],
    "pallidum": [7],
    "hippocampus": [8],
    "amygdala": [9],
    "lateral ventricle": [3],
    "brainstem": [13],
    "cerebellum": [2, 4],
    "3rd ventricle": [11],
    "4th ventricle": [12],
}
MNI9 = {"caudate": [1], "cerebellum": [2], "putamen": [7], "thalamus": [9]}
SEG4 = {"caudate": [1], "cerebellum": [2], "putamen": [3], "thalamus": [4]}


# --- data ------------------------------------------------------------------------------------
def load_subjects(data: Path):
    from diffusionreg.image import read_image

    b = data / "brain"
    subj = {
        "vxm": (
            read_image(b / "vxm_test_scan_T1.nii.gz", dtype=np.float32),
            {"aseg": read_image(b / "vxm_test_scan_aseg.nii.gz")},
        ),
        "oasisA": (
            read_image(b / "oasis_A_norm.nii.gz", dtype=np.float32),
            {"seg13": read_image(b / "oasis_A_seg13.nii.gz"), "seg4": read_image(b / "oasis_A_seg4_mni.nii.gz")},
        ),
        "mni": (
            read_image(b / "mni152_T1_1mm.nii.gz", dtype=np.float32),
            {"mni9": read_image(b / "mni152_maxprob9_on_mni152_T1_1mm_grid.nii.gz")},
        ),
    }
    return subj


def label_sets(a: str, b: str):
    """(labels key of a, mapping a, labels key of b, mapping b) for the structures both have."""
    maps = {"vxm": ("aseg", ASEG), "oasisA": ("seg13", SEG13), "mni": ("mni9", MNI9)}
    ka, ma = maps[a]
    kb, mb = maps[b]
    if "mni" in (a, b):  # only the 4 MNI structures are shared
        if a == "oasisA":
            ka, ma = "seg4", SEG4
        if b == "oasisA":
            kb, mb = "seg4", SEG4
        ma = {k: v for k, v in ma.items() if k in MNI9}
        mb = {k: v for k, v in mb.items() if k in MNI9}
    names = [n for n in ma if n in mb]
    return ka, {n: ma[n] for n in names}, kb, {n: mb[n] for n in names}


def centred_rotation(image, angle_deg, axis) -> np.ndarray:
    """4x4 LPS rotation by ``angle_deg`` about ``axis`` through the image centre."""
    return centred_affine(image.grid.centre_world(), rotation_about_axis(axis, angle_deg))


def rotated(image, angle_deg, axis):
    """Header-only rotation about the image centre (content rotated in world, exact)."""
    from diffusionreg.image import Image

    return Image(image.array, centred_rotation(image, angle_deg, axis) @ image.affine)


def real_cases(subj):
    cases = [("mni", "vxm"), ("mni", "oasisA"), ("vxm", "oasisA"), ("oasisA", "vxm"), ("vxm", "mni"), ("oasisA", "mni")]
    out = [{"name": f"{f} <- {m}", "fixed": f, "moving": m, "rot": None} for f, m in cases]
    out.append({"name": "mni <- oasisA rot25 oblique", "fixed": "mni", "moving": "oasisA", "rot": (25.0, (1.0, 1.0, 1.0))})
    out.append({"name": "vxm <- oasisA rot25 oblique", "fixed": "vxm", "moving": "oasisA", "rot": (25.0, (1.0, -0.5, 0.8))})
    return out


def dice(fixed_labels, moving_labels, transform, map_f, map_m) -> dict:
    """Dice per structure; moving labels warped nearest-neighbour onto the fixed grid through
    the fixed->moving LPS transform (SimpleITK's resampler, same convention as ours)."""
    import SimpleITK as sitk

    from diffusionreg.image import Image
    from diffusionreg.transforms import AffineTransform, to_sitk_transform

    ref = fixed_labels.to_sitk()
    mov = Image(moving_labels.array.astype(np.int16), moving_labels.affine).to_sitk()
    out = sitk.Resample(
        mov, ref, to_sitk_transform(AffineTransform(np.asarray(transform))), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16
    )
    warped = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    fl = fixed_labels.array
    res = {}
    for name in map_f:
        a = np.isin(fl, map_f[name])
        b = np.isin(warped, map_m[name])
        s = a.sum() + b.sum()
        res[name] = float(2 * (a & b).sum() / s) if s else float("nan")
    return res


def synthetic_cases(n: int, seed: int, image):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        axis = rng.normal(size=3)
        ang = rng.uniform(-30, 30)
        scale = rng.uniform(0.85, 1.15, size=3)
        d = rng.normal(size=3)
        trans = d / np.linalg.norm(d) * rng.uniform(0, 20)
        lin = rotation_about_axis(axis, ang) @ np.diag(scale)
        truth = centred_affine(image.grid.centre_world(), lin, trans)
        cases.append(
            {
                "name": f"synthetic {i}",
                "truth": truth,
                "angle": float(ang),
                "scale": scale.tolist(),
                "translation_mm": float(np.linalg.norm(trans)),
                "seed": int(rng.integers(1 << 30)),
            }
        )
    return cases


def pose_cases(subjects: dict, angles, seed: int):
    """One known affine per subject and angle: rotation by the angle about a random oblique axis
    (no component under 0.2 of its length, so never near a coordinate axis), a 10-30 mm translation
    in a random direction and a per-axis scale of 0.9-1.1."""
    rng = np.random.default_rng(seed)
    cases = []
    for name, image in subjects.items():
        for angle in angles:
            axis = oblique_axis(rng)
            scale = rng.uniform(0.9, 1.1, size=3)
            d = rng.normal(size=3)
            trans = d / np.linalg.norm(d) * rng.uniform(10, 30)
            truth = centred_affine(image.grid.centre_world(), rotation_about_axis(axis, angle) @ np.diag(scale), trans)
            cases.append(
                {
                    "name": f"{name} {angle:.0f} deg",
                    "subject": name,
                    "truth": truth,
                    "angle": float(angle),
                    "axis": axis.tolist(),
                    "scale": scale.tolist(),
                    "translation_mm": float(np.linalg.norm(trans)),
                    "seed": int(rng.integers(1 << 30)),
                }
            )
    return cases


def oblique_axis(rng) -> np.ndarray:
    """A random unit axis with no component under 0.2 of its length (never near a coordinate axis)."""
    axis = rng.normal(size=3)
    while np.min(np.abs(axis)) < 0.2 * np.linalg.norm(axis):
        axis = rng.normal(size=3)
    return axis / np.linalg.norm(axis)


def _oasis_scan(data: Path, file: str):
    """An OASIS T1 brain, cropped to its head."""
    from diffusionreg.image import crop_or_pad, read_image

    image = read_image(data / "brain" / file, dtype=np.float32)
    return crop_or_pad(image, (40, 30, 30), (176, 190, 200))


def oasis_b_scan(data: Path):
    """The held-out T1 brain, cropped to its head."""
    return _oasis_scan(data, "oasis_B_norm.nii.gz")


def oasis_a_scan(data: Path):
    """A training T1 brain (the same-subject case of the pose sweep), cropped to its head."""
    return _oasis_scan(data, "oasis_A_norm.nii.gz")


def ge_ct_scan(data: Path):
    """The held-out GE head CT (DICOM, 0.49 x 0.49 x 4 mm, gantry tilt) in HU + 1024, clipped at 0:
    non-negative like the MRI scans, so ``synthetic_moving`` (noise, bias, cut) and
    ``mean_error_mm`` (voxels above 10 % of the maximum: soft tissue and bone) apply as they are."""
    from diffusionreg.image import read_image
    from diffusionreg.midline.pose import to_hounsfield

    hu, _ = to_hounsfield(read_image(data / "headct" / "ge_hispeed_head_tilt_dicom", dtype=np.float32))
    return nonnegative_ct(hu)


def nonnegative_ct(hu):
    """A CT in HU as HU + 1024 clipped at 0 (air 0, like the MRI scans' background)."""
    from diffusionreg.midline.pose import HU_OFFSET

    return hu.with_array(np.clip(hu.array + HU_OFFSET, 0.0, None).astype(np.float32))


def cadaver_ct_scan(data: Path):
    """The UNC cadaver head CT (1 x 1 x 2 mm, geometry assumed by the data's README; stored as
    HU + 1024, converted as ``ge_ct_scan``). A training scan of ``head-ct``."""
    from diffusionreg.image import read_image
    from diffusionreg.midline.pose import to_hounsfield

    hu, _ = to_hounsfield(read_image(data / "headct" / "cthead_unc_cadaver_256x256x113.nii.gz", dtype=np.float32))
    return nonnegative_ct(hu)


SYNTHETIC_SUBJECTS = {"oasisB": oasis_b_scan, "ge-ct": ge_ct_scan}
POSE_SUBJECTS = {"oasisA": oasis_a_scan, **SYNTHETIC_SUBJECTS}
SUBJECT_NAMES = {"oasisB": "oasis_B", "ge-ct": "GE head CT"}


def synthetic_moving(image, truth, seed):
    """moving(truth(x)) = image(x) on a fresh 1 mm grid, with a smooth bias field (+-20 %),
    Gaussian noise (2 % of the max) and a 0-15 mm cut of the field of view on one side."""
    from scipy import ndimage

    from diffusionreg.image import centred_grid, crop_or_pad, resample

    rng = np.random.default_rng(seed)
    centre = truth[:3, :3] @ image.grid.centre_world() + truth[:3, 3]
    grid = centred_grid((192, 208, 208), 1.0, centre)
    mov = resample(image, grid, np.linalg.inv(truth), default=0.0)
    coarse = rng.normal(size=(4, 4, 4))
    field = ndimage.zoom(coarse, np.array(mov.shape) / 4.0, order=3)[: mov.shape[0], : mov.shape[1], : mov.shape[2]]
    field = np.exp(0.2 * field / max(np.abs(field).max(), 1e-6))
    arr = mov.array * field + rng.normal(scale=0.02 * float(mov.array.max()), size=mov.shape)
    arr = np.clip(arr, 0, None).astype(np.float32)
    mov = mov.with_array(arr)
    axis = int(rng.integers(3))
    cut = int(rng.integers(0, 16))
    start = [0, 0, 0]
    shape = list(mov.shape)
    shape[axis] -= cut
    if rng.random() < 0.5:
        start[axis] = cut
    return crop_or_pad(mov, start, shape)


def point_distances_mm(a, b, points: np.ndarray) -> np.ndarray:
    """``|a(x) - b(x)|`` (mm) at each LPS point ``x`` of ``points`` (N, 3), for 4x4 LPS point maps."""
    from diffusionreg.spaces import apply_affine

    return np.linalg.norm(apply_affine(np.asarray(a), points) - apply_affine(np.asarray(b), points), axis=1)


def mean_error_mm(est, truth, image) -> float:
    from diffusionreg.spaces import apply_affine

    idx = np.argwhere(image.array[::3, ::3, ::3] > 0.1 * image.array.max()) * 3.0
    return float(point_distances_mm(est, truth, apply_affine(image.affine, idx)).mean())


# --- methods ---------------------------------------------------------------------------------
def changed_refinement(cfg, changes: dict):
    """The refinement of the model config ``cfg`` with ``changes`` (keys of config.json's
    ``inference.refine``, e.g. ``{"metric": "ncc"}``), validated as the model's config.json is."""
    from diffusionreg.affine.config import AffineConfig

    data = cfg.to_dict()
    data["inference"]["refine"].update(changes)
    return AffineConfig.from_dict(data).inference.refine


class Ours:
    def __init__(self, bidirectional=False, model=None, refine=False, pose_search=False, modality="mri", refine_changes=None):
        from diffusionreg.affine.register import load_model

        self.model = load_model(model, modality)
        self.modality = modality
        self.bidirectional = bidirectional
        # refine=True: the model's refinement (diffusion, then the test-time mutual-information refinement),
        # with refine_changes (--refine) applied; False: the published method alone. pose_search:
        # True/False, or None for the model's default.
        self.refine_iterations = None if refine else 0
        self.refine = changed_refinement(self.model.cfg, refine_changes) if refine and refine_changes else None
        self.pose_search = pose_search
        self.last_extra = {}

    def __call__(self, fixed, moving, tmp: Path) -> np.ndarray:
        from diffusionreg.affine.register import register_affine

        start, cpu0 = time.perf_counter(), time.process_time()
        result = register_affine(
            fixed,
            moving,
            self.model,
            modality=self.modality,
            bidirectional=self.bidirectional,
            refine=self.refine,
            refine_iterations=self.refine_iterations,
            pose_search=self.pose_search,
        )
        self.last_seconds = time.perf_counter() - start
        self.last_cpu = time.process_time() - cpu0
        self.last_extra = {
            "similarity_nmi": result.similarity,
            "doubtful": result.doubtful,
            "starts": len(result.starts),
            "search_seconds": result.search_seconds,
        }
        return result.transform.matrix


class Ants:
    def __call__(self, fixed, moving, tmp: Path) -> np.ndarray:
        import ants

        from diffusionreg.image import write_image
        from diffusionreg.transforms import read_transform

        write_image(fixed, tmp / "f.nii")
        write_image(moving, tmp / "m.nii")
        f = ants.image_read(str(tmp / "f.nii"))
        m = ants.image_read(str(tmp / "m.nii"))
        start, cpu0 = time.perf_counter(), time.process_time()
        reg = ants.registration(fixed=f, moving=m, type_of_transform="Affine", outprefix=str(tmp / "ants_"), random_seed=1)
        self.last_seconds = time.perf_counter() - start
        self.last_cpu = time.process_time() - cpu0
        return read_transform(reg["fwdtransforms"][0]).matrix


class Sitk:
    def __call__(self, fixed, moving, tmp: Path) -> np.ndarray:
        import SimpleITK as sitk

        from diffusionreg.transforms import from_sitk_transform

        f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
        m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
        start, cpu0 = time.perf_counter(), time.process_time()
        init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.05, seed=1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=300, gradientMagnitudeTolerance=1e-6
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(init, inPlace=False)
        out = reg.Execute(f, m)
        self.last_seconds = time.perf_counter() - start
        self.last_cpu = time.process_time() - cpu0
        t = from_sitk_transform(out)
        if hasattr(t, "matrix"):
            return t.matrix
        pts = np.eye(4)  # composite: evaluate on 4 points and solve
        p = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100.0]])
        q = t.map_points(p)
        a = np.linalg.lstsq(np.c_[p, np.ones(4)], q, rcond=None)[0].T
        pts[:3] = a
        return pts


# --- head CT against the CT template (issue 16, ``--ct-template-set``) -----------------------
CT_TEMPLATE_SUBJECTS = {"cadaver": cadaver_ct_scan, "ge-ct": ge_ct_scan}
CT_TEMPLATE_STEM = "affine_ct-template"  # bench/out names
MATTES_BINS = 50  # as the SimpleITK arm's metric


def ct_template(data: Path):
    """(template, head mask): the midline pipeline's pose template (the 2 mm SCCT head with skull,
    in HU) as HU + 1024 clipped at 0, and its head mask (the midline's: above 0 HU, largest
    component, holes filled), uint8 on the template grid."""
    from diffusionreg.midline.headframe import head_mask
    from diffusionreg.midline.heads import pose_template

    hu = pose_template(data / "headct")
    return nonnegative_ct(hu), hu.with_array(head_mask(hu.array).astype(np.uint8))


def template_similarity(template, mask, moving, matrix, bins: int = MATTES_BINS) -> dict:
    """Similarity of ``moving`` to ``template`` through ``matrix`` (4x4, template LPS -> moving LPS):
    the moving image resampled (linear) onto the template grid, air (0) outside its field of view,
    then over the voxels of ``mask``: Mattes mutual information (nats, ``bins`` bins, every mask
    voxel; SimpleITK's metric) and the normalised cross-correlation (Pearson, -1..1)."""
    import SimpleITK as sitk

    from diffusionreg.image import resample

    warped = resample(moving, template.grid, np.asarray(matrix, dtype=np.float64), default=0.0)
    inside = mask.array > 0
    f = template.array[inside].astype(np.float64)
    w = warped.array[inside].astype(np.float64)
    f, w = f - f.mean(), w - w.mean()
    denominator = np.sqrt((f * f).sum() * (w * w).sum())
    ncc = float((f * w).sum() / denominator) if denominator > 0 else 0.0
    if not np.any(w):  # a constant image shares no information (and has no histogram range)
        return {"mattes_mi": 0.0, "ncc": ncc}
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(sitk.Cast(mask.to_sitk(), sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.TranslationTransform(3))  # the images share the template grid
    as_float = lambda image: sitk.Cast(image.to_sitk(), sitk.sitkFloat32)  # noqa: E731
    return {"mattes_mi": -float(reg.MetricEvaluate(as_float(template), as_float(warped))), "ncc": ncc}


def mask_points(mask) -> np.ndarray:
    """LPS centres (N, 3) of the voxels of ``mask``."""
    from diffusionreg.spaces import apply_affine

    return apply_affine(mask.affine, np.argwhere(mask.array > 0).astype(np.float64))


def agreement_mm(matrices: dict, points: np.ndarray) -> dict:
    """{(a, b): (mean, max)} distance (mm) between the points mapped by each pair of transforms."""
    names = list(matrices)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = point_distances_mm(matrices[a], matrices[b], points)
            out[(a, b)] = (float(d.mean()), float(d.max()))
    return out


def ct_template_cases(subjects: dict, angles, seed: int) -> list[dict]:
    """Each CT of ``subjects`` as it is (0 deg) and rotated about its centre by each other angle
    about a random oblique axis (a header-only rotation, exact). ``start`` is that rotation (4x4
    LPS); a method's result ``T`` (template -> rotated CT) maps back as ``inv(start) @ T``."""
    from diffusionreg.image import Image

    rng = np.random.default_rng(seed)
    cases = []
    for name, image in subjects.items():
        for angle in angles:
            axis = oblique_axis(rng)
            start = centred_rotation(image, angle, axis)
            cases.append(
                {
                    "name": f"{name} {angle:.0f} deg",
                    "subject": name,
                    "angle": float(angle),
                    "axis": axis.tolist(),
                    "start": start,
                    "moving": Image(image.array, start @ image.affine),
                }
            )
    return cases


def run_ct_template_method(name, method, template, cases, tmp: Path, log, partial: Path) -> list[dict]:
    """Register each case's CT onto the template; rows carry the result mapped back to the CT as
    it is stored (``matrix``, template -> CT LPS) and the registration's own times."""
    rows = []
    for case in cases:
        mat, sec, cpu = _timed(method, template, case["moving"], tmp)
        rows.append(
            {
                "case": case["name"],
                "subject": case["subject"],
                "angle": case["angle"],
                "axis": case["axis"],
                "matrix": (np.linalg.inv(case["start"]) @ np.asarray(mat)).tolist(),
                "seconds": sec,
                "cpu_seconds": cpu,
                **dict(getattr(method, "last_extra", {}) or {}),
            }
        )
        log(f"{name:12s} ct-template {case['name']:20s} {sec:6.1f} s (cpu {cpu:.1f} s)")
        partial.write_text(json.dumps(rows, indent=1))
    return rows


def ct_template_report(all_rows: dict, labels: dict, template, mask, images: dict) -> dict:
    """Scores of every row (one function for all methods), the pairwise agreement of the methods'
    0 deg results per CT, and each rotated start's distance to the 0 deg results."""
    points = mask_points(mask)
    for rows in all_rows.values():
        for r in rows:
            r.update(template_similarity(template, mask, images[r["subject"]], r["matrix"]))
    report = {"scores": all_rows, "agreement": {}, "poses": [], "mask_voxels": int(len(points))}
    for subject in images:
        at_zero = {m: r["matrix"] for m, rows in all_rows.items() for r in rows if r["subject"] == subject and r["angle"] == 0}
        report["agreement"][subject] = [
            {"a": labels[a], "b": labels[b], "mean_mm": d[0], "max_mm": d[1]}
            for (a, b), d in agreement_mm(at_zero, points).items()
        ]
        best = max(
            (m for m in at_zero if m != "none"),
            key=lambda m: next(r["mattes_mi"] for r in all_rows[m] if r["subject"] == subject and r["angle"] == 0),
            default=None,
        )
        for m, rows in all_rows.items():
            for r in rows:
                if r["subject"] != subject or r["angle"] == 0:
                    continue
                entry = {"method": labels[m], "case": r["case"], "mattes_mi": r["mattes_mi"], "ncc": r["ncc"]}
                if m in at_zero:
                    entry["to_own_0deg_mm"] = float(point_distances_mm(r["matrix"], at_zero[m], points).mean())
                if best is not None:
                    entry["to_best_0deg_mm"] = float(point_distances_mm(r["matrix"], at_zero[best], points).mean())
                    entry["best_0deg"] = labels[best]
                report["poses"].append(entry)
    return report


class MidlinePose:
    """The MidlineShift pipeline's own head CT alignment (rigid + isotropic scale by mutual
    information, :func:`diffusionreg.midline.pose.align_to_template`, default settings), on the
    images in HU (the bench's CTs are HU + 1024 clipped at 0)."""

    def __call__(self, fixed, moving, tmp: Path) -> np.ndarray:
        from diffusionreg.midline.config import MidlineInference
        from diffusionreg.midline.pose import HU_OFFSET, align_to_template

        in_hu = lambda image: image.with_array(image.array - np.float32(HU_OFFSET))  # noqa: E731
        start, cpu0 = time.perf_counter(), time.process_time()
        pose = align_to_template(in_hu(moving), in_hu(fixed), MidlineInference())
        self.last_seconds = time.perf_counter() - start
        self.last_cpu = time.process_time() - cpu0
        return pose.matrix


def _timed(method, fixed, moving, tmp):
    """(matrix, wall seconds, CPU seconds) of the registration itself (file writing for ANTs
    excluded). CPU time (this process, all threads) is the fair measure when the machine is
    shared; wall time is reported too."""
    if method is None:
        return np.eye(4), 0.0, 0.0
    start = time.perf_counter()
    mat = method(fixed, moving, tmp)
    wall = getattr(method, "last_seconds", time.perf_counter() - start)
    return mat, wall, getattr(method, "last_cpu", wall)


def run_method(
    name, method, subj, real, synth, synth_image, tmp: Path, log, partial: Path | None = None, pose=(), pose_images=None
) -> dict:
    rows = {"real": [], "synthetic": [], "pose": []}

    def save():
        if partial is not None:
            partial.write_text(json.dumps(rows, indent=1))

    for case in real:
        fixed, flabels = subj[case["fixed"]]
        moving, mlabels = subj[case["moving"]]
        if case["rot"] is not None:
            moving = rotated(moving, *case["rot"])
            mlabels = {k: rotated(v, *case["rot"]) for k, v in mlabels.items()}
        mat, sec, cpu = _timed(method, fixed, moving, tmp)
        ka, ma, kb, mb = label_sets(case["fixed"], case["moving"])
        d = dice(flabels[ka], mlabels[kb], mat, ma, mb)
        rows["real"].append(
            {
                "case": case["name"],
                "dice": d,
                "mean_dice": float(np.nanmean(list(d.values()))),
                "seconds": sec,
                "cpu_seconds": cpu,
                "matrix": mat.tolist(),
            }
        )
        log(f"{name:12s} {case['name']:32s} dice {rows['real'][-1]['mean_dice']:.3f}  {sec:6.1f} s (cpu {cpu:.1f} s)")
        save()
    for case in synth:
        moving = case["moving"]
        mat, sec, cpu = _timed(method, synth_image, moving, tmp)
        err = mean_error_mm(mat, case["truth"], synth_image)
        rows["synthetic"].append(
            {
                "case": case["name"],
                "error_mm": err,
                "seconds": sec,
                "cpu_seconds": cpu,
                "angle": case["angle"],
                "scale": case["scale"],
                "translation_mm": case["translation_mm"],
            }
        )
        log(
            f"{name:12s} {case['name']:32s} error {err:6.2f} mm {sec:6.1f} s (cpu {cpu:.1f} s) "
            f"(rot {case['angle']:.0f} deg, |t| {case['translation_mm']:.0f} mm)"
        )
        save()
    for case in pose:
        image = pose_images[case["subject"]]
        mat, sec, cpu = _timed(method, image, case["moving"], tmp)
        err = mean_error_mm(mat, case["truth"], image)
        extra = dict(getattr(method, "last_extra", {}) or {})
        rows["pose"].append(
            {
                "case": case["name"],
                "subject": case["subject"],
                "angle": case["angle"],
                "error_mm": err,
                "seconds": sec,
                "cpu_seconds": cpu,
                "translation_mm": case["translation_mm"],
                "scale": case["scale"],
                **extra,
            }
        )
        note = "".join(f" {k} {v:.3f}" if isinstance(v, float) else f" {k} {v}" for k, v in extra.items())
        log(f"{name:12s} pose {case['name']:26s} error {err:7.2f} mm {sec:6.1f} s (cpu {cpu:.1f} s){note}")
        save()
    return rows


def parse_log(path: Path, label: str) -> dict:
    """Per-case results from the lines this script prints (for a run that was interrupted
    before it wrote its JSON). Matrices are not in the log, so such rows have none."""
    import re

    rows = {"real": [], "synthetic": []}
    for line in path.read_text().splitlines():
        if not line.startswith(label + " "):
            continue
        rest = line[len(label) :].strip()
        m = re.match(r"(.+?)\s+dice ([0-9.]+)\s+([0-9.]+) s \(cpu ([0-9.]+) s\)", rest)
        if m:
            rows["real"].append(
                {
                    "case": m.group(1).strip(),
                    "mean_dice": float(m.group(2)),
                    "seconds": float(m.group(3)),
                    "cpu_seconds": float(m.group(4)),
                    "matrix": None,
                    "from_log": True,
                }
            )
            continue
        m = re.match(r"(synthetic \d+)\s+error\s+([0-9.]+) mm\s+([0-9.]+) s \(cpu ([0-9.]+) s\)", rest)
        if m:
            rows["synthetic"].append(
                {
                    "case": m.group(1),
                    "error_mm": float(m.group(2)),
                    "seconds": float(m.group(3)),
                    "cpu_seconds": float(m.group(4)),
                    "from_log": True,
                }
            )
    return rows


def summarise(name, rows) -> dict:
    real = rows["real"]
    syn = rows["synthetic"]
    errs = np.array([r["error_mm"] for r in syn]) if syn else np.array([np.nan])
    secs = [r["seconds"] for r in real + syn]
    cpus = [r.get("cpu_seconds", r["seconds"]) for r in real + syn]
    return {
        "method": name,
        "mean_dice": float(np.mean([r["mean_dice"] for r in real])) if real else float("nan"),
        "per_pair": {r["case"]: r["mean_dice"] for r in real},
        "synthetic_median_mm": float(np.median(errs)),
        "synthetic_mean_mm": float(np.mean(errs)),
        "synthetic_max_mm": float(np.max(errs)),
        "failures": int((errs > 2.0).sum()) if syn else 0,
        "n_synthetic": len(syn),
        "seconds_mean": float(np.mean(secs)) if secs else float("nan"),
        "real_seconds_mean": float(np.mean([r["seconds"] for r in real])) if real else float("nan"),
        "real_cpu_seconds_mean": float(np.mean([r.get("cpu_seconds", r["seconds"]) for r in real])) if real else float("nan"),
        "cpu_seconds_mean": float(np.mean(cpus)) if cpus else float("nan"),
    }


def write_markdown(summaries, cases, args, path: Path, partial_methods=()):
    names = [s["method"] for s in summaries]
    lines = [
        "# Affine benchmark",
        "",
        f"Command: `.venv/bin/python bench/affine.py {shlex.join(sys.argv[1:])}` "
        f"({args.threads} thread(s) for every method; CPU; the machine was shared, so CPU "
        "time is the comparable cost and wall time is inflated for every method).",
        "",
    ]
    if partial_methods:
        lines += [f"Interrupted before all cases finished (rows listed as nan are missing): {', '.join(partial_methods)}.", ""]
    lines += [
        "## Real pairs: mean Dice of shared deep structures (fixed <- moving)",
        "",
        "| pair | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for c in cases:
        lines.append(
            f"| {c['name']} | " + " | ".join(f"{s['per_pair'].get(c['name'], float('nan')):.3f}" for s in summaries) + " |"
        )
    lines.append("| **mean** | " + " | ".join(f"**{s['mean_dice']:.3f}**" for s in summaries) + " |")
    lines.append(
        "| mean wall / CPU time per pair (s) | "
        + " | ".join(f"{s['real_seconds_mean']:.1f} / {s['real_cpu_seconds_mean']:.1f}" for s in summaries)
        + " |"
    )
    lines += [
        "",
        f"## Synthetic known affines on the held-out {SUBJECT_NAMES[args.synthetic_subject]} "
        f"({summaries[0]['n_synthetic']} cases; ours as {args.modality})",
        "",
        "| method | median error (mm) | mean (mm) | max (mm) | failures (> 2 mm) | mean wall time (s) | mean CPU time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {s['synthetic_median_mm']:.2f} | {s['synthetic_mean_mm']:.2f} | "
            f"{s['synthetic_max_mm']:.2f} | {s['failures']}/{s['n_synthetic']} | {s['seconds_mean']:.1f} | "
            f"{s['cpu_seconds_mean']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def section_head(title: str, description: str, args, columns) -> list[str]:
    """Markdown lines of a results section: title, the command that ran, ``description``, a table header."""
    return [
        f"## {title}",
        "",
        f"Command: `nice -n 10 .venv/bin/python bench/affine.py {shlex.join(sys.argv[1:])}` ({args.threads} thread(s) for "
        f"every method; CPU). {description}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def write_pose_markdown(all_rows: dict, labels: dict, order, args, path: Path) -> None:
    """Pose sweep tables: per angle, each method's mean error and successes; then timings."""
    methods = [m for m in order if all_rows.get(m, {}).get("pose")]
    angles = sorted({r["angle"] for m in methods for r in all_rows[m]["pose"]})
    lines = section_head(
        "Pose sweep: any starting rotation (issue 16)",
        "Each subject moved by a rotation of the given angle about a random oblique axis, "
        "a 10-30 mm translation and a per-axis scale of 0.9-1.1, with a bias field, noise and a field-of-view cut; "
        "error = mean displacement error over brain voxels, success = error < 2 mm.",
        args,
        ["start rotation"] + [labels[m] for m in methods],
    )
    for angle in angles:
        cells = []
        for m in methods:
            rows = [r for r in all_rows[m]["pose"] if r["angle"] == angle]
            ok = sum(r["error_mm"] < 2.0 for r in rows)
            errors = ", ".join(f"{r['error_mm']:.2f}" for r in rows)
            cells.append(f"{ok}/{len(rows)} ({errors} mm)")
        lines.append(f"| {angle:.0f}° | " + " | ".join(cells) + " |")
    total = []
    for m in methods:
        rows = all_rows[m]["pose"]
        total.append(f"**{sum(r['error_mm'] < 2.0 for r in rows)}/{len(rows)}**")
    lines.append("| **success** | " + " | ".join(total) + " |")
    lines.append(
        "| mean wall / CPU s per pair | "
        + " | ".join(
            f"{np.mean([r['seconds'] for r in all_rows[m]['pose']]):.1f} / "
            f"{np.mean([r['cpu_seconds'] for r in all_rows[m]['pose']]):.1f}"
            for m in methods
        )
        + " |"
    )
    for m in methods:
        rows = all_rows[m]["pose"]
        if rows and "similarity_nmi" in rows[0]:
            lines += [
                "",
                f"{labels[m]}, per case (similarity = final normalised mutual information; starts = "
                "pose-search starts run through the diffusion; search = wall seconds of the pose search):",
                "",
                "| case | error (mm) | similarity | doubtful | starts | search (s) | wall / CPU (s) |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['case']} | {r['error_mm']:.2f} | {r['similarity_nmi']:.3f} | {r['doubtful']} | "
                    f"{r['starts']} | {r['search_seconds']:.1f} | {r['seconds']:.1f} / {r['cpu_seconds']:.1f} |"
                )
    path.write_text("\n".join(lines) + "\n")


def write_ct_template_markdown(report: dict, labels: dict, order, args, path: Path) -> None:
    """The CT-template tables: similarity per case and method, pairwise agreement at 0 deg, poses."""
    scores = report["scores"]
    methods = [m for m in order if m in scores]
    cases = list(dict.fromkeys(r["case"] for m in methods for r in scores[m]))
    lines = section_head(
        "Head CT against the CT template (issue 16)",
        "Fixed: the midline pipeline's pose template (2 mm SCCT head with skull); moving: each CT "
        "as stored (0 deg) or rotated about its centre by the angle about a random oblique axis. Scores over the "
        f"template's head mask ({int(report['mask_voxels'])} voxels) of the CT resampled onto the template grid: "
        f"Mattes mutual information (nats, {MATTES_BINS} bins, every voxel) / normalised cross-correlation.",
        args,
        ["case"] + [labels[m] for m in methods],
    )
    for case in cases:
        cells = []
        for m in methods:
            hit = [r for r in scores[m] if r["case"] == case]
            cells.append(f"{hit[0]['mattes_mi']:.3f} / {hit[0]['ncc']:.3f}" if hit else "")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines.append(
        "| mean wall / CPU s per case | "
        + " | ".join(
            f"{np.mean([r['seconds'] for r in scores[m]]):.1f} / {np.mean([r['cpu_seconds'] for r in scores[m]]):.1f}"
            for m in methods
        )
        + " |"
    )
    for subject, pairs in report["agreement"].items():
        names = list(dict.fromkeys([p["a"] for p in pairs] + [p["b"] for p in pairs]))
        if not pairs:
            continue
        lines += [
            "",
            f"Agreement on {subject} (0 deg): mean / max distance (mm) between the template head-mask points "
            "mapped by each pair of methods.",
            "",
            "| | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        cell = {(p["a"], p["b"]): f"{p['mean_mm']:.2f} / {p['max_mm']:.2f}" for p in pairs}
        cell.update({(b, a): v for (a, b), v in list(cell.items())})
        for a in names:
            lines.append(f"| {a} | " + " | ".join(cell.get((a, b), "-") for b in names) + " |")
    if report["poses"]:
        lines += [
            "",
            "Rotated starts, mapped back to the stored CT: mean distance (mm, template head mask) to the method's own "
            "0 deg result and to the 0 deg result of highest mutual information.",
            "",
            "| case | method | MI / NCC | to own 0 deg (mm) | to best 0 deg (mm) |",
            "|---|---|---|---|---|",
        ]
        for e in report["poses"]:
            lines.append(
                f"| {e['case']} | {e['method']} | {e['mattes_mi']:.3f} / {e['ncc']:.3f} | "
                f"{e.get('to_own_0deg_mm', float('nan')):.2f} | {e.get('to_best_0deg_mm', float('nan')):.2f} ({e.get('best_0deg', '')}) |"
            )
    path.write_text("\n".join(lines) + "\n")


def overlay(subj, case, results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusionreg.image import resample

    fixed, _ = subj[case["fixed"]]
    moving, _ = subj[case["moving"]]
    if case["rot"] is not None:
        moving = rotated(moving, *case["rot"])
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.4), squeeze=False)
    f = fixed.array / np.percentile(fixed.array, 99.5)
    for col, (name, mat) in enumerate(results):
        w = resample(moving, fixed.grid, np.asarray(mat), default=0.0).array
        w = w / max(np.percentile(w, 99.5), 1e-6)
        for row, sl in enumerate(
            [(slice(None), fixed.shape[1] // 2, slice(None)), (fixed.shape[0] // 2, slice(None), slice(None))]
        ):
            rgb = np.stack([np.clip(f[sl], 0, 1), np.clip(w[sl], 0, 1), np.clip(f[sl], 0, 1)], -1)
            axes[row, col].imshow(np.rot90(rgb), interpolation="nearest")
            axes[row, col].set_axis_off()
        axes[0, col].set_title(name, fontsize=9)
    fig.suptitle(f"{case['name']}: fixed magenta, warped moving green", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def method_factories(args):
    """(factories, labels, order) of the methods ``--methods`` can name; ours with ``--model`` and ``--modality``."""
    factories = {
        "none": lambda: None,
        "ours": lambda: Ours(False, args.model, modality=args.modality),
        "ours-bidir": lambda: Ours(True, args.model, modality=args.modality),
        "ours-refine": lambda: Ours(False, args.model, refine=True, modality=args.modality, refine_changes=args.refine),
        "ours-default": lambda: Ours(
            False, args.model, refine=True, pose_search=None, modality=args.modality, refine_changes=args.refine
        ),
        "ants": Ants,
        "sitk": Sitk,
        "midline-pose": MidlinePose,
    }
    labels = {
        "none": "identity (no registration)",
        "ours": "spatial diffusion",
        "ours-bidir": "spatial diffusion (bidir)",
        "ours-refine": "spatial diffusion + refinement (no pose search)",
        "ours-default": "pose search + spatial diffusion + refinement (default)",
        "ants": "ANTs affine",
        "sitk": "SimpleITK MI",
        "midline-pose": "midline pose (rigid + scale, MI)",
    }
    order = ["none", "ours", "ours-bidir", "ours-refine", "ours-default", "ants", "sitk", "midline-pose"]
    return factories, labels, order


def variant_suffix(args, wanted: list[str], labels: dict, order: list[str]) -> str:
    """A variant (e.g. another model) caches its methods under their own names, beside the defaults'
    caches: the suffix of those names ('' without ``--variant``); ``labels`` and ``order`` gain them."""
    suffix = f"-{args.variant}" if args.variant else ""
    for m in wanted:
        labels[m + suffix] = labels[m] + (f" [{args.variant}]" if args.variant else "")
    order += [m + suffix for m in wanted if suffix]
    return suffix


def run_ct_template_set(args) -> None:
    """``--ct-template-set``: each CT of ``--ct-template-subjects`` onto the CT template by each method,
    scored by :func:`ct_template_report`; per-method caches ``affine_ct-template_<method>.json``."""
    factories, labels, order = method_factories(args)
    template, mask = ct_template(args.data)
    images = {name: CT_TEMPLATE_SUBJECTS[name](args.data) for name in args.ct_template_subjects.split(",")}
    angles = [float(a) for a in args.ct_template_angles.split(",")]
    cases = ct_template_cases(images, angles, args.seed)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    suffix = variant_suffix(args, wanted, labels, order)
    all_rows = {}
    with tempfile.TemporaryDirectory() as tmpd:
        for m in wanted:
            partial = OUT / f"{CT_TEMPLATE_STEM}_{m}{suffix}.partial.json"
            rows = run_ct_template_method(labels[m + suffix], factories[m](), template, cases, Path(tmpd), print, partial)
            (OUT / f"{CT_TEMPLATE_STEM}_{m}{suffix}.json").write_text(json.dumps(rows, indent=1))
            all_rows[m + suffix] = rows
    if args.reuse:
        for m in order:
            if m not in all_rows and (OUT / f"{CT_TEMPLATE_STEM}_{m}.json").exists():
                all_rows[m] = json.loads((OUT / f"{CT_TEMPLATE_STEM}_{m}.json").read_text())
    # Only the cases of this run's subjects and angles (a cache may hold others); methods in table order.
    names = {c["name"] for c in cases}
    all_rows = {m: [r for r in all_rows[m] if r["case"] in names] for m in order if m in all_rows}
    report = ct_template_report(all_rows, labels, template, mask, images)
    stem = CT_TEMPLATE_STEM + suffix  # the combined outputs of a variant run
    (OUT / f"{stem}.json").write_text(json.dumps(report, indent=1))
    write_ct_template_markdown(report, labels, order, args, OUT / f"{stem}.md")
    print((OUT / f"{stem}.md").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--methods", default="none,ours,ants,sitk")
    p.add_argument("--model", default=None, help="model name or path (default brain-mri)")
    p.add_argument("--synthetic", type=int, default=10)
    p.add_argument(
        "--synthetic-subject",
        choices=sorted(SYNTHETIC_SUBJECTS),
        default="oasisB",
        help="the scan of the synthetic known-affine set: oasisB (held-out T1 brain) or ge-ct (the held-out GE head CT)",
    )
    p.add_argument("--modality", default="mri", help="the modality ours registers as (ct for ge-ct)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse cached results of other methods")
    p.add_argument("--real", default="all", help="'all' or 'none'")
    p.add_argument("--pose-sweep", action="store_true", help="run the pose sweep (issue 16)")
    p.add_argument("--pose-angles", default="0,45,90,135,180", help="start rotations of the pose sweep (deg)")
    p.add_argument(
        "--pose-subjects",
        default="oasisB,oasisA",
        help=f"subjects of the pose sweep, of {', '.join(POSE_SUBJECTS)} (oasisB and ge-ct are held out; ge-ct: --modality ct)",
    )
    p.add_argument("--variant", default="", help="name of this run's variant (e.g. head-ct-any): its own caches")
    p.add_argument(
        "--ct-template-set",
        action="store_true",
        help="register real head CTs onto the CT template (issue 16) and score by MI, NCC and agreement; nothing else",
    )
    p.add_argument(
        "--ct-template-subjects", default="cadaver,ge-ct", help=f"CTs of the set, of {', '.join(CT_TEMPLATE_SUBJECTS)}"
    )
    p.add_argument("--ct-template-angles", default="0", help="start rotations of the CTs (deg, about oblique axes)")
    p.add_argument(
        "--import-log",
        nargs=2,
        action="append",
        metavar=("METHOD", "LOG"),
        help="recover the per-case lines of an interrupted run's log as partial results",
    )
    p.add_argument(
        "--refine",
        type=json.loads,
        default=None,
        help='changes to the model\'s refinement for ours-refine and ours-default, as JSON (e.g. \'{"metric": "ncc"}\'; the keys '
        "of the model's config.json inference.refine); needs --variant",
    )
    args = p.parse_args()
    if args.refine and not args.variant:
        p.error("--refine needs --variant (the changed refinement caches under its own name)")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.ct_template_set:
        run_ct_template_set(args)
        return

    subj = load_subjects(args.data)
    real = real_cases(subj) if args.real == "all" else []
    b_img = SYNTHETIC_SUBJECTS[args.synthetic_subject](args.data)
    stem = "affine" if args.synthetic_subject == "oasisB" else f"affine_{args.synthetic_subject}"  # bench/out names
    synth = synthetic_cases(args.synthetic, args.seed, b_img)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    for case in synth if wanted else []:  # generated once, shared by every method
        case["moving"] = synthetic_moving(b_img, case["truth"], case["seed"])
    pose, pose_images = [], {}
    if args.pose_sweep:
        for name in args.pose_subjects.split(","):
            pose_images[name] = POSE_SUBJECTS[name](args.data)
        angles = [float(a) for a in args.pose_angles.split(",")]
        pose = pose_cases(pose_images, angles, args.seed)
        for case in pose:
            case["moving"] = synthetic_moving(pose_images[case["subject"]], case["truth"], case["seed"])
    factories, labels, order = method_factories(args)
    suffix = variant_suffix(args, wanted, labels, order)
    all_rows = {}
    with tempfile.TemporaryDirectory() as tmpd:
        for m in wanted:
            method = factories[m]()
            rows = run_method(
                labels[m + suffix],
                method,
                subj,
                real,
                synth,
                b_img,
                Path(tmpd),
                print,
                OUT / f"{stem}_{m}{suffix}.partial.json",
                pose,
                pose_images,
            )
            (OUT / f"{stem}_{m}{suffix}.json").write_text(json.dumps(rows, indent=1))
            all_rows[m + suffix] = rows
    for m, log in args.import_log or []:
        (OUT / f"{stem}_{m}.partial.json").write_text(json.dumps(parse_log(Path(log), labels[m]), indent=1))
    partial_methods = []
    if args.reuse:
        for m in order:
            if m in all_rows:
                continue
            if (OUT / f"{stem}_{m}.json").exists():
                all_rows[m] = json.loads((OUT / f"{stem}_{m}.json").read_text())
            elif (OUT / f"{stem}_{m}.partial.json").exists():  # an interrupted run
                all_rows[m] = json.loads((OUT / f"{stem}_{m}.partial.json").read_text())
                partial_methods.append(labels[m])
    stem += suffix  # the combined outputs of a variant run
    if args.pose_sweep:
        write_pose_markdown(all_rows, labels, order, args, OUT / f"affine_pose{suffix}.md")
        print((OUT / f"affine_pose{suffix}.md").read_text())
        if not real and not synth:
            return
    summaries = [summarise(labels[m], all_rows[m]) for m in order if m in all_rows]
    (OUT / f"{stem}.json").write_text(json.dumps({"summaries": summaries, "rows": all_rows}, indent=1))
    write_markdown(summaries, real, args, OUT / f"{stem}.md", partial_methods)
    if real:
        case = next(c for c in real if c["rot"] is not None)
        res = []
        for m in order:
            if m not in all_rows:
                continue
            hit = [r for r in all_rows[m]["real"] if r["case"] == case["name"] and r.get("matrix")]
            if hit:
                res.append((labels[m], hit[0]["matrix"]))
        overlay(subj, case, res, OUT / f"affine_overlay{suffix}.png")
    print((OUT / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
