"""Training and calibrating the scene detector's shape classifier, and writing its card (issue 20 §1).

* **Training crops** (:func:`labelled_crops`): every candidate the segmenter extracts from rendered
  ``split="train"`` scenes (random resolutions, 80 % randomly degraded) is labelled with the shape of the
  scene object it matches; candidates from negatives images (:mod:`snapgen.eval.negatives`,
  ``stream="train"``, :data:`~snapgen.eval.negatives.TRAIN_TYPES` only) are labelled "not a shape"
  (a ``merged`` pair only when the segmenter leaves it in one piece), their real shape with its shape.
  Optional **generator texture** (``vae_p`` / ``--vae-p``, default 0 = off, docs/evaluation.md): further
  64 px renders through the shipped VAE with latent noise (:mod:`snapgen.eval.vae_texture`), positives only.
* **Training** (:func:`train_detector`): AdamW + one-cycle on those crops, cross-entropy with label
  smoothing and the reject class weighted ``reject_weight`` (0.4: fewer real objects rejected), cheap
  on-the-fly mask-gain and pixel-noise augmentation; one thread, seeded: deterministic.
* **Calibration** (:func:`fit_temperature`): temperature scaling (Guo et al., 2017), the one scalar ``T``
  minimising the NLL of ``softmax(logits / T)`` on a calibration split never trained on (``split="val"``
  renders + ``stream="calib"`` negatives, randomly degraded); stored as ``config.temperature``. The ECE
  before/after is measured on a third set (``split="heldout"`` renders + ``stream="heldout"`` negatives,
  which include the held-out negative types).
* **Card** (``card.json`` beside the weights): :func:`~snapgen.eval.detector_eval.accuracy_report`, the
  ECEs, thresholds and the command; read it with :func:`~snapgen.eval.detector.load_detector_card`.

``OMP_NUM_THREADS=1 python -m snapgen.eval.detector --out models/evaluators/scene-detector``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scenes import SceneDataset
from .degrade import degrade_image
from .detector import CARD_NAME, DetectorConfig, SceneDetector, default_detector_dir, load_detector
from .detector_eval import (
    COUNTING_CONFIDENCE,
    DETECTION_CONFIDENCE,
    _match,
    accuracy_report,
    expected_calibration_error,
)
from .negatives import negative_image

__all__ = ["fit_temperature", "labelled_crops", "main", "train_detector"]

VAE_P = 0.0  # the shipped detector's generator-texture fraction (CLI default)
_RESOLUTIONS = (40, 48, 64, 64, 64, 80, 96, 128)


def _crops_of(det, image, rng, augment: bool):
    regions = det.regions(image)
    out = []
    for r in regions:
        jit = (np.array([rng.uniform(0.9, 1.12), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)])
               if augment else None)
        x = det.crop(r.soft, r.box, jitter=jit, texmap=r.texmap)
        if augment and rng.random() < 0.5:
            x = x.flip(-1)
        out.append(x)
    return regions, out


def labelled_crops(det: SceneDetector, n_scenes: int, n_negatives: int, seed: int, split: str = "train",
                   stream: str = "train", augment: bool = True, degrade_p: float = 0.8, vae_p: float = 0.0,
                   vae_sigma: float = 0.3, vae=None):
    """(crops (N, 1, S, S), labels (N,)) from ``n_scenes`` renders of ``split`` and ``n_negatives``
    negatives images of ``stream`` (label ``len(shapes)`` = "not a shape"), through ``det``'s segmenter;
    plus ``round(vae_p * n_scenes)`` further 64 px renders of ``split`` with generator texture
    (:func:`_vae_crops`; ``vae`` = the autoencoder, default the shipped one)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, len(split), len(stream)]))
    shape_idx = {s: i for i, s in enumerate(det.config.shapes)}
    reject = len(det.config.shapes)
    datasets, crops, labels = {}, [], []
    for i in range(n_scenes):
        res = int(rng.choice(_RESOLUTIONS)) if augment else 64
        if res not in datasets:
            datasets[res] = SceneDataset(res, seed=1000 + seed, split=split)
        sample = datasets[res].generate(i)
        image = degrade_image(sample.image, rng) if rng.random() < degrade_p else sample.image
        regions, xs = _crops_of(det, image, rng, augment)
        for x, j in zip(xs, _match(sample.meta["objects"], [r.box for r in regions])):
            if j >= 0:
                crops.append(x)
                labels.append(shape_idx[sample.meta["objects"][j]["shape"]])
    for i in range(n_negatives if det.config.reject else 0):
        res = int(rng.choice(_RESOLUTIONS)) if augment else 64
        s = negative_image(i, seed=seed, stream=stream, resolution=res)
        image = degrade_image(s.image, rng) if rng.random() < degrade_p else s.image
        regions, xs = _crops_of(det, image, rng, augment)
        match = _match(s.shapes, [r.box for r in regions])
        inside = []
        for r in regions:
            cx, cy = (r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2
            inside.append([k for k, ng in enumerate(s.negatives)
                           if ng["box"][0] - 1 <= cx <= ng["box"][2] + 1 and ng["box"][1] - 1 <= cy <= ng["box"][3] + 1])
        n_in = [sum(k in ins for ins in inside) for k in range(len(s.negatives))]
        for x, j, ins in zip(xs, match, inside):
            if j >= 0:
                crops.append(x)
                labels.append(shape_idx[s.shapes[j]["shape"]])
            elif ins and not any(s.negatives[k]["type"] == "merged" and n_in[k] > 1 for k in ins):
                crops.append(x)
                labels.append(reject)
    if vae_p > 0:
        xs, ys = _vae_crops(det, n_scenes, int(round(vae_p * n_scenes)), seed, split, augment, degrade_p,
                            vae_sigma, vae)
        crops += xs
        labels += ys
    return torch.stack(crops), torch.tensor(labels)


def _vae_crops(det, start: int, n: int, seed: int, split: str, augment: bool, degrade_p: float,
               sigma_max: float, vae):
    """Positive crops from renders ``start .. start + n - 1`` of ``split`` at 64 px (the shipped generator's
    size), each through the shipped VAE with latent noise sigma ~ U(0, ``sigma_max``) in one batched pass
    (:mod:`snapgen.eval.vae_texture`), then degraded with probability ``degrade_p / 2``. Own seeded streams,
    so the other crops are the same with or without them. Negatives never get this texture."""
    from .vae_texture import latent_noise_images, shipped_autoencoder

    rng = np.random.default_rng(np.random.SeedSequence([seed, 13, len(split)]))
    shape_idx = {s: i for i, s in enumerate(det.config.shapes)}
    ds = SceneDataset(64, seed=1000 + seed, split=split)
    samples = [ds.generate(start + k) for k in range(n)]
    sigmas = rng.uniform(0, sigma_max, n)
    images = latent_noise_images(vae if vae is not None else shipped_autoencoder(), [s.image for s in samples],
                                 sigmas, torch.Generator().manual_seed(int(rng.integers(2 ** 31))))
    crops, labels = [], []
    for sample, image in zip(samples, images):
        if rng.random() < degrade_p / 2:
            image = degrade_image(image, rng)
        regions, xs = _crops_of(det, image, rng, augment)
        for x, j in zip(xs, _match(sample.meta["objects"], [r.box for r in regions])):
            if j >= 0:
                crops.append(x)
                labels.append(shape_idx[sample.meta["objects"][j]["shape"]])
    return crops, labels


@torch.no_grad()
def _logits(det: SceneDetector, x: torch.Tensor) -> torch.Tensor:
    det.eval()
    return torch.cat([det.net(x[i:i + 1024]) for i in range(0, len(x), 1024)])


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (a fine grid over log T in
    [1/8, 8]: deterministic, and a 1-D convex-in-practice problem needs no optimiser)."""
    grid = torch.exp(torch.linspace(np.log(1 / 8), np.log(8), 401, dtype=torch.float64))
    lg = logits.double()
    nll = torch.stack([F.cross_entropy(lg / t, labels) for t in grid])
    return float(grid[int(nll.argmin())])


def train_detector(out_dir: str | os.PathLike | None = None, steps: int = 2000, seed: int = 0,
                   n_scenes: int = 3000, n_negatives: int = 2500, batch_size: int = 128, lr: float = 3e-3,
                   config: DetectorConfig | None = None, log_every: int = 250, calibrate: int = 600,
                   reject_weight: float = 0.4, vae_p: float = VAE_P, vae_sigma: float = 0.3) -> SceneDetector:
    """Train the shape classifier (module docstring), then fit its temperature on ``calibrate`` val
    renders + as many calibration negatives (0 = keep T = 1); ``vae_p`` > 0 adds that fraction of
    generator-texture renders (latent noise up to ``vae_sigma``) to both. Deterministic from ``seed``: runs on one
    thread (restored afterwards) with seeded generators. Saves to ``out_dir`` when given."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        det = SceneDetector(config)
        vae = None
        if vae_p > 0:
            from .vae_texture import shipped_autoencoder
            vae = shipped_autoencoder()
        x, y = labelled_crops(det, n_scenes, n_negatives, seed, vae_p=vae_p, vae_sigma=vae_sigma, vae=vae)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(det.net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        weight = torch.ones(len(det.config.classes))
        if det.config.reject:
            weight[-1] = reject_weight
        det.train()
        for step in range(steps):
            idx = torch.randint(len(x), (batch_size,), generator=g)
            xb = x[idx]
            # cheap on-the-fly augmentation: mask gain (faint or saturated objects) and pixel noise
            # (mask channel only; the outside channel stays exact)
            gain = 0.75 + 0.5 * torch.rand(batch_size, 1, 1, 1, generator=g)
            noise = 0.05 * torch.randn(xb.shape, generator=g)
            if xb.shape[1] > 1:
                noise[:, 1:] = 0
            xb = xb.clone()
            xb[:, :1] = (xb[:, :1] * gain + noise[:, :1]).clamp(0, 1)
            loss = F.cross_entropy(det.net(xb), y[idx], weight=weight, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  ({len(x)} crops, "
                      f"{int((y == len(det.config.shapes)).sum())} not a shape)", flush=True)
        det.eval()
        if calibrate:
            xc, yc = labelled_crops(det, calibrate, calibrate, seed, split="val", stream="calib", augment=False,
                                    vae_p=vae_p, vae_sigma=vae_sigma, vae=vae)
            t = fit_temperature(_logits(det, xc), yc)
            det.config = dataclasses.replace(det.config, temperature=t)
        if out_dir is not None:
            det.save_pretrained(out_dir)
        return det
    finally:
        torch.set_num_threads(prev_threads)


def calibration_report(det: SceneDetector, n: int = 600, seed: int = 0) -> dict[str, float]:
    """ECE (top label, 15 bins) and NLL before / after temperature scaling on held-out crops
    (``split="heldout"`` renders + ``stream="heldout"`` negatives, randomly degraded 80 %)."""
    x, y = labelled_crops(det, n, n, seed + 1, split="heldout", stream="heldout", augment=False)
    lg = _logits(det, x).double()
    t = det.config.temperature
    p0, p1 = torch.softmax(lg, -1), torch.softmax(lg / t, -1)
    return {"crops": len(y), "temperature": t, "accuracy": float((p1.argmax(-1) == y).double().mean()),
            "ece_before": expected_calibration_error(p0, y), "ece_after": expected_calibration_error(p1, y),
            "nll_before": float(F.cross_entropy(lg, y)), "nll_after": float(F.cross_entropy(lg / t, y))}


def sceneeval_ceiling(det: SceneDetector, per_category: int = 30) -> dict[str, float]:
    """SceneEval's overall score of real renders against their own metadata (30 per category and split,
    as ``tests/test_sceneeval.py``): the ceiling, which must stay >= 0.98."""
    from ..data.scenes import CATEGORIES
    from .sceneeval import evaluate_images, metadata_from_scene, summarize

    out = {}
    for split in ("val", "heldout"):
        samples = [SceneDataset(64, split=split, categories=[c], seed=0)[i] for c in CATEGORIES
                   for i in range(per_category)]
        res = evaluate_images([s.image for s in samples], [metadata_from_scene(s) for s in samples], det)
        out[split] = summarize(res)["overall"]
    return out


def write_card(det: SceneDetector, out_dir: str | os.PathLike, report: dict, calib: dict, command: str,
               seconds: float | None = None, measured_with: str | None = None) -> Path:
    """``card.json``: the measured figures (see :func:`~snapgen.eval.detector.load_detector_card`)."""
    real = {k: v for k, v in report.items() if k.split("/")[0] in ("val", "heldout")}
    card = {
        "detector": "SceneDetector (segment, then a shape CNN with a 'not a shape' class)",
        "classes": list(det.config.classes),
        "thresholds": {"detection": DETECTION_CONFIDENCE, "counting": COUNTING_CONFIDENCE},
        "real_renders": {"sceneeval_ceiling": sceneeval_ceiling(det),
                         "shape_accuracy_overall": float(np.mean([v["both"] for v in real.values()])),
                         "per_split": real},
        "touching": {k: v for k, v in report.items() if k.startswith("touching/")},
        "negatives_heldout": {k.split("/")[-1]: v for k, v in report.items() if k.startswith("negatives/")},
        "pure_noise": report.get("noise"),
        "calibration": calib,
        "command": command,
        "measured_with": measured_with or command,
        "train_seconds": seconds,
    }
    path = Path(out_dir) / CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train SceneEval's shape classifier, calibrate it, write its card.")
    p.add_argument("--out", default=str(default_detector_dir()), help="output folder (save_pretrained)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--scenes", type=int, default=3000, help="training scenes (crops come from these)")
    p.add_argument("--negatives", type=int, default=2500, help="training negatives images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-p", type=float, default=VAE_P,
                   help="extra generator-texture renders, as a fraction of --scenes (0 = none)")
    p.add_argument("--vae-sigma", type=float, default=0.3, help="latent noise sigma ~ U(0, this)")
    p.add_argument("--eval-images", type=int, default=300, help="held-out renders per evaluation")
    p.add_argument("--eval-only", action="store_true", help="evaluate the detector in --out, no training")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0, seconds = time.perf_counter(), None
    if args.eval_only:
        det = load_detector(args.out)
    else:
        det = train_detector(args.out, steps=args.steps, seed=args.seed, n_scenes=args.scenes,
                             n_negatives=args.negatives, vae_p=args.vae_p, vae_sigma=args.vae_sigma)
        seconds = round(time.perf_counter() - t0, 1)
    report = accuracy_report(det, args.eval_images)
    for k, v in report.items():
        print(f"{k:48s} " + "  ".join(f"{m} {x:.4f}" for m, x in v.items()))
    calib = calibration_report(det, seed=args.seed)
    print("calibration " + "  ".join(f"{k} {v:.4f}" for k, v in calib.items()))
    cmd = ("OMP_NUM_THREADS=1 python -m snapgen.eval.detector " + " ".join(sys.argv[1:] if argv is None
                                                                           else argv)).strip()
    train_cmd = cmd
    if args.eval_only and (Path(args.out) / CARD_NAME).is_file():   # keep how the weights were made
        old = json.loads((Path(args.out) / CARD_NAME).read_text(encoding="utf-8"))
        train_cmd, seconds = old.get("command", cmd), old.get("train_seconds")
    print("card:", write_card(det, args.out, report, calib, train_cmd, seconds, measured_with=cmd))


if __name__ == "__main__":
    main()
