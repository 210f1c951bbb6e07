"""Self-supervised training of the spatial-diffusion affine network.

Per sample: a training volume (on a canonical grid of twice the network resolution, same
field of view) gets a shared global augmentation (rotation, scale, shift, gamma) while it is
sampled onto the network grid; the fixed and moving copies then get independent artifacts
and crops; the moving copy is warped by a one-jump forward sample M at a random t; the target
is M^-1 and the loss the mean Frobenius norm. Adam, warm-up + cosine LR, EMA, atomic
checkpoints every few minutes, resume, validation (loss + recovery error in mm of random
known affines on held-back volumes), tqdm, DDP under torchrun (gloo on CPU).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusionreg.distributed import any_rank, end_process_group, start_process_group
from diffusionreg.image import Image, read_image

from diffusionreg.errors import InputError
from .artifacts import apply_artifacts
from .config import AffineConfig
from .network import AffineDiffusionNet, count_parameters
from .preprocess import foreground_centroid, network_grid, to_network
from .reverse import reverse_process
from .sampling import euler_rotation, frobenius_loss, sample_forward, sample_uniform_affine, warp
from .schedule import Schedule

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


# --- data ---------------------------------------------------------------------------------
def list_volumes(paths) -> list[Path]:
    """Files given directly, or every image file of given folders (sorted). Files whose name
    contains 'seg', 'aseg', 'label', 'mask' or 'maxprob' are skipped in folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.iterdir()):
                name = f.name.lower()
                if name.endswith(VOLUME_SUFFIXES) and not any(
                        s in name for s in ("seg", "label", "mask", "maxprob")):
                    out.append(f)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"training data not found: {p}")
    if not out:
        raise InputError("no training volumes found in " + ", ".join(map(str, paths)))
    return out


def load_subject(path: Path, cfg: AffineConfig) -> torch.Tensor:
    """(1, 2S, 2S, 2S) tensor in [-1, 1] at half the network spacing (same field of view as
    the network grid), centred on the intensity centroid, canonical LPS orientation.
    Anti-aliased for the network spacing."""
    image = read_image(path, what="training volume", dtype=np.float32)
    centre = foreground_centroid(image)
    grid = network_grid(cfg, centre, size=2 * cfg.grid_size, spacing=cfg.spacing_mm / 2)
    return torch.from_numpy(to_network(image, grid, cfg).array)[None]


def _global_theta(cfg: AffineConfig, gen: torch.Generator) -> torch.Tensor:
    """Shared augmentation as a normalised (3,4) matrix: rotation (about the configured
    axes; x, y, z are the torch axes k, j, i), isotropic scale, shift in voxels / (S/2)."""
    ang = torch.zeros(3, dtype=torch.float64)
    lim = math.radians(cfg.global_rotation_deg)
    for a, name in enumerate("xyz"):
        if name in cfg.global_rotation_axes:
            ang[a] = (torch.rand((), generator=gen, dtype=torch.float64) * 2 - 1) * lim
    lo, hi = cfg.global_scale
    scale = lo + (hi - lo) * float(torch.rand((), generator=gen))
    rot = euler_rotation(ang[None])[0] * scale
    shift = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * cfg.global_shift_vox
    theta = torch.zeros(3, 4, dtype=torch.float64)
    theta[:, :3] = rot
    theta[:, 3] = shift / (cfg.grid_size / 2)
    return theta


def make_batch(subjects: list[torch.Tensor], cfg: AffineConfig, sched: Schedule,
               gen: torch.Generator, modality: str = "mri", batch_size: int | None = None):
    """Returns (x (B,2,S,S,S), t (B,), cls (B,), target (B,3,4), M (B,4,4))."""
    b = batch_size or cfg.batch_size
    s = cfg.grid_size
    fixed, moving = [], []
    for _ in range(b):
        vol = subjects[int(torch.randint(len(subjects), (), generator=gen))]
        theta = _global_theta(cfg, gen).float()[None]
        grid = F.affine_grid(theta, [1, 1, s, s, s], align_corners=False)
        base = F.grid_sample((vol[None] + 1) / 2, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0]
        g_lo, g_hi = cfg.gamma_range
        gamma = g_lo + (g_hi - g_lo) * float(torch.rand((), generator=gen))
        base = base.clamp(0, 1) ** gamma * 2 - 1
        for out in (fixed, moving):
            v = apply_artifacts(base, cfg, gen, modality)
            if cfg.noise_std > 0:
                v = v + cfg.noise_std * torch.randn(v.shape, generator=gen)
            out.append(v.clamp(-1, 1))
    fixed_t = torch.stack(fixed)
    moving_t = torch.stack(moving)
    t = torch.randint(1, cfg.timesteps + 1, (b,), generator=gen)
    mat, target = sample_forward(t, sched, (s, s, s), cfg.affine_prob, cfg.clamp_sigmas, gen)
    moving_t = warp(moving_t, mat)
    cls = torch.full((b,), cfg.class_index(modality), dtype=torch.long)
    if cfg.n_classes > 1 and cfg.class_dropout > 0:
        drop = torch.rand((b,), generator=gen) < cfg.class_dropout
        cls = torch.where(drop, torch.zeros_like(cls), cls)
    return torch.cat([fixed_t, moving_t], 1), t, cls, target, mat


# --- EMA and learning rate -----------------------------------------------------------------
class EMA:
    """Exponential moving average: decay = min(beta, 1 - (1 + n)^-power) where n counts
    updates after ``start`` steps (before that the EMA copies the weights)."""

    def __init__(self, model: torch.nn.Module, beta: float, power: float, start: int):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.beta, self.power, self.start = beta, power, start

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        src = model.state_dict()
        if step <= self.start:
            self.model.load_state_dict(src)
            return
        decay = min(self.beta, max(0.0, 1 - (1 + step - self.start) ** -self.power))
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(decay).add_(src[k], alpha=1 - decay)
            else:
                v.copy_(src[k])


def lr_factor(step: int, warmup: int, total: int) -> float:
    """min((t+1)/warmup, 1/2 (1 + cos(pi (t - warmup) / (total - warmup))))."""
    warm = (step + 1) / max(warmup, 1)
    if total <= warmup:
        return min(warm, 1.0)
    cos = 0.5 * (1 + math.cos(math.pi * min(max(step - warmup, 0), total - warmup)
                              / (total - warmup)))
    return min(warm, cos)


# --- validation ------------------------------------------------------------------------------
@torch.no_grad()
def validate(net, subjects, cfg, sched, n_loss: int = 8, n_recover: int = 4,
             steps: int | None = None, seed: int = 1234) -> dict:
    """Single-step loss at random t and recovery error (mm) of random known affines
    (magnitude up to 1.2 Sigma(T)) by the reverse process, on held-back volumes."""
    gen = torch.Generator().manual_seed(seed)
    net.eval()
    x, t, cls, target, _ = make_batch(subjects, cfg, sched, gen, batch_size=n_loss)
    loss = float(frobenius_loss(net(x, t, cls), target))
    s = cfg.grid_size
    errs = []
    half_mm = s * cfg.spacing_mm / 2  # normalised unit in mm (cubic grid)
    for i in range(n_recover):
        vol = subjects[i % len(subjects)]
        base = F.interpolate(vol[None], size=(s, s, s), mode="trilinear", align_corners=False)
        mat = sample_uniform_affine(1, sched, (s, s, s), generator=gen)
        moving = warp(base, mat)
        comp, _ = reverse_process(net, base, moving, sched, steps)
        truth = torch.linalg.inv(mat)
        # displacement error over brain voxels of the fixed grid
        pts = F.affine_grid(torch.eye(3, 4)[None], [1, 1, s, s, s], align_corners=False)
        mask = base[0, 0] > -0.8
        p = pts[0][mask].double()
        ph = torch.cat([p, torch.ones(len(p), 1, dtype=torch.float64)], 1)
        d = (ph @ (comp[0] - truth[0])[:3].T).norm(dim=1) * half_mm
        errs.append(float(d.mean()))
    return {"val_loss": loss, "recovery_mm_mean": float(np.mean(errs)),
            "recovery_mm_median": float(np.median(errs)), "recovery_mm_max": float(np.max(errs))}


# --- checkpoints -----------------------------------------------------------------------------
def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_weights(model: torch.nn.Module, cfg: AffineConfig, out_dir: Path,
                   name: str = "model", meta: dict | None = None) -> Path:
    """Write ``name.safetensors`` + ``config.json`` (atomic)."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    path = out_dir / f"{name}.safetensors"
    tmp = out_dir / f".{name}.tmp.safetensors"
    save_file(tensors, str(tmp), metadata={"format": "pt", "task": "affine",
                                           **{k: str(v) for k, v in (meta or {}).items()}})
    os.replace(tmp, path)
    cfg_tmp = out_dir / ".config.json.tmp"
    cfg_tmp.write_text(cfg.to_json())
    os.replace(cfg_tmp, out_dir / "config.json")
    return path


@dataclass
class TrainOptions:
    data: list[str]
    output: str
    config: AffineConfig
    steps: int = 1000
    modality: str = "mri"
    val: list[str] | None = None       # held-back volumes (files or folders)
    resume: bool = False
    checkpoint_minutes: float = 4.0
    val_every: int = 500
    threads: int | None = None
    progress: str = "tqdm"             # tqdm | none
    max_minutes: float | None = None   # stop (with a checkpoint) after this wall time
    val_recover: int = 4


def train(opts: TrainOptions) -> dict:
    """Train; returns the final summary dict. Rank 0 writes ``output/``:
    ``checkpoint.pt`` (model, EMA, optimiser, step, RNG; resumable), ``ema.safetensors``,
    ``config.json``, ``history.jsonl``."""
    import torch.distributed as dist

    cfg = opts.config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    owns_group = start_process_group(world)
    out = Path(opts.output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    files = list_volumes(opts.data)
    val_files = list_volumes(opts.val) if opts.val else []
    val_set = {f.resolve() for f in val_files}
    files = [f for f in files if f.resolve() not in val_set]
    if not files:
        raise InputError("every training volume is also a validation volume")
    subjects = [load_subject(f, cfg) for f in files]
    val_subjects = [load_subject(f, cfg) for f in val_files] or subjects[:1]
    sched = Schedule.from_config(cfg)

    torch.manual_seed(cfg.seed)
    net = AffineDiffusionNet(cfg)
    ema = EMA(net, cfg.ema_beta, cfg.ema_power, cfg.ema_start)
    optim = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    step, elapsed = 0, 0.0
    ckpt_path = out / "checkpoint.pt"
    if opts.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        optim.load_state_dict(state["optim"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        gens = state["rng"]
        gen.set_state(gens[rank % len(gens)])
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net)
    sched_lr = lambda s: lr_factor(s, cfg.warmup_steps, opts.steps)  # noqa: E731

    def save():
        rng = [gen.get_state()]
        if world > 1:
            gathered = [torch.empty_like(rng[0]) for _ in range(world)]
            dist.all_gather(gathered, rng[0])
            rng = gathered
        if rank != 0:
            return
        _atomic_torch_save({"model": net.state_dict(), "ema": ema.model.state_dict(),
                            "optim": optim.state_dict(), "step": step, "elapsed": elapsed,
                            "rng": rng, "config": json.loads(cfg.to_json())}, ckpt_path)
        export_weights(ema.model, cfg, out, "ema", {"step": step})

    if rank == 0:
        print(f"affine training: {len(files)} volumes ({', '.join(f.name for f in files)}); "
              f"validation: {', '.join(f.name for f in val_files) or '(train[0])'}; "
              f"{count_parameters(net)} parameters; config {cfg.name}; world {world}; "
              f"start step {step}/{opts.steps}", flush=True)
    bar = None
    if rank == 0 and opts.progress == "tqdm":
        from tqdm import tqdm
        bar = tqdm(total=opts.steps, initial=step, desc="train affine", mininterval=10,
                   dynamic_ncols=True)
    last_ckpt = time.monotonic()
    t0 = time.monotonic() - elapsed
    run_start = time.monotonic()
    history = out / "history.jsonl"
    summary: dict = {}
    loss_avg = None
    while step < opts.steps:
        net.train()
        for g in optim.param_groups:
            g["lr"] = cfg.lr * sched_lr(step)
        x, t, cls, target, _ = make_batch(subjects, cfg, sched, gen, opts.modality)
        pred = model(x, t, cls if cfg.n_classes > 1 else None)
        loss = frobenius_loss(pred, target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optim.step()
        step += 1
        ema.update(net, step)
        lv = loss.item()
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        elapsed = time.monotonic() - t0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{optim.param_groups[0]['lr']:.2e}",
                            refresh=False)
        if rank == 0 and (step % 50 == 0 or step == 1):
            rec = {"step": step, "loss": lv, "loss_avg": loss_avg, "elapsed_s": round(elapsed, 1)}
            with open(history, "a", encoding="utf-8") as h:
                h.write(json.dumps(rec) + "\n")
        done = step >= opts.steps
        out_of_time = (opts.max_minutes is not None
                       and time.monotonic() - run_start > 60 * opts.max_minutes)
        out_of_time = any_rank(out_of_time, world)
        if (opts.val_every and step % opts.val_every == 0) or done or out_of_time:
            if rank == 0:
                summary = validate(ema.model, val_subjects, cfg, sched,
                                   n_recover=opts.val_recover)
                summary.update(step=step, loss_avg=loss_avg, elapsed_s=round(elapsed, 1))
                print("validation " + json.dumps(summary), flush=True)
                with open(history, "a", encoding="utf-8") as h:
                    h.write(json.dumps({"validation": summary}) + "\n")
        tick = time.monotonic() - last_ckpt > 60 * opts.checkpoint_minutes
        tick = any_rank(tick, world)
        if tick or done or out_of_time:
            save()
            last_ckpt = time.monotonic()
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    end_process_group(owns_group)
    summary.setdefault("step", step)
    summary["loss_avg"] = loss_avg
    summary["elapsed_s"] = round(elapsed, 1)
    return summary
