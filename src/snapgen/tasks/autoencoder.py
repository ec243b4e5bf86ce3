"""``autoencoder``: the small VAE on images (random crops; L1 + MSE + KL), exported with measured latent
scale/shift and its held-out PSNR."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..data.base import image_to_tensor
from ..data.batches import batch_indices, part_indices, part_slice
from ..utils.random import randn
from .base import ROLES, StepGenerator, Task, check_keys
from .registry import register_task

__all__ = ["AutoencoderTask", "psnr"]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = (x.clamp(-1, 1) - y.clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


@register_task("autoencoder", kind="train")
class AutoencoderTask(Task):
    # FSDP2 unshards parameters inside forward() only; this task calls the VAE's encode/decode directly
    strategies = ("ddp",)

    def __init__(self, cfg, device: torch.device):
        from ..data.mixed import build_dataset
        from ..vae import Autoencoder, AutoencoderConfig

        self.cfg, self.device = cfg, device
        check_keys("data", cfg.data, {"spec", "eval_spec", "crop", "eval_count"})
        check_keys("loss", cfg.loss, {"kl_weight", "mse_weight", "l1_weight"})
        model_kw = dict(cfg.model)
        init_from = model_kw.pop("init_from", None)
        self.freeze_encoder = bool(model_kw.pop("freeze_encoder", False))
        self.vae = Autoencoder(AutoencoderConfig(**model_kw)).to(device)
        if init_from:  # e.g. a tiny decoder trained against a frozen, already trained encoder
            src = Autoencoder.from_pretrained(init_from)
            self.vae.encoder.load_state_dict(src.encoder.state_dict())
        if self.freeze_encoder:
            self.vae.encoder.requires_grad_(False)
        if "spec" not in cfg.data:
            raise ValueError("autoencoder task needs data.spec (a dataset spec, see snapgen.data.build_dataset)")
        self.dataset = build_dataset(cfg.data["spec"])
        self.eval_dataset = build_dataset(cfg.data["eval_spec"]) if cfg.data.get("eval_spec") else None
        self.crop = int(cfg.data.get("crop", 0))
        self.kl_weight = float(cfg.loss.get("kl_weight", 1e-6))
        self.l1_weight = float(cfg.loss.get("l1_weight", 1.0))
        self.mse_weight = float(cfg.loss.get("mse_weight", 1.0))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._replay = StepGenerator(self.generator)

    def modules(self) -> dict:
        return {"vae": (self.vae, ROLES)}

    def _images(self, idx) -> torch.Tensor:
        return torch.stack([image_to_tensor(self.dataset[int(i)].image) for i in idx])

    def loss(self, step: int, part: int = 0):
        B, parts = self.cfg.batch_size, self.parts
        sl = part_slice(part, parts, B)
        x = self._images(part_indices(self.cfg.seed, step, len(self.dataset), B, part, parts))
        if self.crop:  # crop offsets drawn for the global batch, sliced to this part
            H, W = x.shape[-2:]
            rng = np.random.default_rng([self.cfg.seed, 104729, step])
            ys, xs = rng.integers(0, H - self.crop + 1, B * parts), rng.integers(0, W - self.crop + 1, B * parts)
            x = torch.stack([im[:, a:a + self.crop, b:b + self.crop] for im, a, b in zip(x, ys[sl], xs[sl])])
        x = x.to(self.device)
        # the posterior sample of Autoencoder.forward, with noise drawn for the global batch
        post = self.vae.encode(x)
        g = self._replay.begin(step)
        noise = randn((B * parts, *post.mean.shape[1:]), g, dtype=post.mean.dtype)[sl].to(post.mean.device)
        rec = self.vae.decode(post.mean + torch.exp(0.5 * post.logvar) * noise)
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = self.l1_weight * l1 + self.mse_weight * mse + self.kl_weight * kl
        return loss, {"loss_l1": l1.item(), "loss_kl": kl.item(),
                      "psnr": float(10 * math.log10(4.0 / max(mse.item(), 1e-12)))}

    def _eval_images(self, n: int) -> torch.Tensor:
        ds = self.eval_dataset or self.dataset
        n = min(n, len(ds))
        step = max(1, len(ds) // n)
        return torch.stack([image_to_tensor(ds[i * step].image) for i in range(n)])

    @torch.no_grad()
    def sample(self, path: Path, step: int) -> None:
        from ..data.base import tensor_to_image
        from ..utils.images import make_grid

        x = self._eval_images(8).to(self.device)
        rec = self.vae(x, sample=False)[0]
        ims = [tensor_to_image(t) for t in torch.cat([x, rec]).cpu()]
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(ims, cols=8, scale=2).save(path)

    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict:
        n = n or int(self.cfg.data.get("eval_count", 256))
        x = self._eval_images(n)
        vals = []
        for chunk in x.split(64):
            chunk = chunk.to(self.device)
            vals.append(psnr(self.vae(chunk, sample=False)[0], chunk).cpu())
        v = torch.cat(vals)
        return {"psnr_mean": round(float(v.mean()), 3), "psnr_min": round(float(v.min()), 3), "images": len(v),
                "eval_set": "eval_spec" if self.eval_dataset is not None else "training data"}

    @torch.no_grad()
    def latent_stats(self, n: int = 512) -> tuple[float, float]:
        idx = batch_indices(self.cfg.seed + 1, 0, len(self.dataset), min(n, len(self.dataset)))
        zs = [self.vae.encode(self._images(chunk).to(self.device)).mode() for chunk in np.array_split(idx, 8)]
        z = torch.cat(zs)
        return float(z.mean()), float(z.std())

    def export(self, out_dir: Path) -> Path:
        mean, std = self.latent_stats()
        cfg = self.vae.config.replace(shift_factor=round(mean, 6), scaling_factor=round(1.0 / std, 6))
        self.vae.config = cfg  # the exported config carries the normalisation
        self.vae.save_pretrained(out_dir)
        report = {"latent_mean": mean, "latent_std": std, **self.evaluate()}
        (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"autoencoder exported to {out_dir}: {report}")
        return Path(out_dir)
