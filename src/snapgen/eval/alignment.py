"""Image-text alignment: a small CNN image tower trained contrastively against frozen MiniLM sentences.

A CLIP-score stand-in that works offline. The text side is the frozen all-MiniLM-L6-v2 sentence
embedding (masked mean of token features, L2-normalised: the standard sentence-transformers pooling);
only the image tower (and a learned temperature) is trained, with CLIP's symmetric InfoNCE loss on
scenes + emoji, never on a caption that is a SceneEval prompt (issue 20 §2: pairs whose normalised caption is
in any ``prompts/*.jsonl`` set are dropped from the training pool). Captions that occur twice in a batch count as positives for each other.

* :class:`ImageEncoder` -- ``embed(images) -> [N, 384]`` (unit norm, comparable with sentence
  embeddings) and ``features(images) -> [N, F]`` (pooled penultimate features, for Frechet distance).
* :func:`alignment_score` -- cosine similarity between each image and its prompt.
* :func:`train_image_encoder` -- reproduces the shipped weights; deterministic given the seed.
* ``python -m snapgen.eval.alignment --out models/evaluators/image-encoder [--steps N]`` trains, saves and
  prints the ceiling (real held-out pairs), the floor (shuffled pairs) and retrieval top-1 accuracy.

The input gets two coordinate channels (CoordConv), so globally pooled features can still encode where
objects are ("on the left of ...").
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..nn.io import ModelIOMixin
from ..utils.config import JSONConfigMixin
from .. import env

__all__ = ["ImageEncoderConfig", "ImageEncoder", "default_image_encoder_dir", "load_image_encoder",
           "train_image_encoder", "alignment_score", "evaluate_encoder", "heldout_samples",
           "sentence_embeddings", "SentenceEmbedder", "eval_prompt_captions"]

DEFAULT_TRAIN_SOURCES = (
    {"type": "scenes", "weight": 0.6, "length": 1_000_000, "split": "train"},
    {"type": "emoji", "weight": 0.4, "split": "train"},
)


def default_image_encoder_dir() -> Path:
    """The shipped encoder: ``$SNAPGEN_IMAGE_ENCODER`` or ``models/evaluators/image-encoder``."""
    return env.image_encoder_dir()


@dataclass(frozen=True)
class ImageEncoderConfig(JSONConfigMixin):
    _config_kind = "ImageEncoder"

    resolution: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 128)   # one stage each; every stage halves the resolution
    embed_dim: int = 384                              # = MiniLM's sentence dimension
    coord_channels: bool = True                       # append (x, y) coordinate planes to the input
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"invalid ImageEncoderConfig: channels must be non-empty and positive, "
                             f"got {self.channels}")
        if self.resolution <= 0 or self.embed_dim <= 0:
            raise ValueError("invalid ImageEncoderConfig: resolution and embed_dim must be positive")

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ImageEncoder(ModelIOMixin, nn.Module):
    """CNN image tower: 4 stride-2 conv stages (conv3x3/BN/ReLU) -> global average pool -> Linear -> L2 norm."""

    config_class = ImageEncoderConfig

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        cin = 3 + (2 if config.coord_channels else 0)
        stages = []
        for c in config.channels:
            stages.append(_stage(cin, c))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(cin, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    # -- tensors ------------------------------------------------------------------------------------
    def _with_coords(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.coord_channels:
            return x
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([x, xs, ys], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, R, R] in [-1, 1] -> pooled features [B, F]."""
        return self.stages(self._with_coords(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, R, R] in [-1, 1] -> unit-norm embeddings [B, embed_dim]."""
        return F.normalize(self.proj(self.forward_features(x)), dim=-1)

    # -- PIL ----------------------------------------------------------------------------------------
    def to_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image) or len(images) == 0:
            raise ValueError("expected a non-empty list of PIL images")
        r = self.config.resolution
        arrs = []
        for im in images:
            if not isinstance(im, Image.Image):
                raise ValueError(f"expected PIL images, got {type(im).__name__}")
            im = im.convert("RGB")
            if im.size != (r, r):
                im = im.resize((r, r), Image.BICUBIC)
            arrs.append(np.asarray(im, dtype=np.uint8))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
        return x.div(127.5).sub(1.0)

    @torch.no_grad()
    def _batched(self, images, fn, batch_size: int) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            x = self.to_tensor(images)
            return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        finally:
            self.train(was)

    def embed(self, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """PIL images -> [N, embed_dim] L2-normalised embeddings."""
        return self._batched(images, self.forward, batch_size)

    def features(self, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """PIL images -> [N, F] pooled penultimate features (for Frechet distance)."""
        return self._batched(images, self.forward_features, batch_size)


def load_image_encoder(path: str | os.PathLike | None = None) -> ImageEncoder:
    """Load the shipped encoder (default :func:`default_image_encoder_dir`) in eval mode."""
    path = Path(path) if path is not None else default_image_encoder_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"image encoder not found at {path}; train it with "
                                f"`python -m snapgen.eval.alignment --out {path}`")
    return ImageEncoder.from_pretrained(path).eval()


# -- text side ----------------------------------------------------------------------------------------
@torch.no_grad()
def sentence_embeddings(text_encoder, captions: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings: masked mean of token features, L2-normalised. [N, 384]."""
    out = []
    for i in range(0, len(captions), batch_size):
        tokens, mask = text_encoder.encode(list(captions[i:i + batch_size]))
        m = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(F.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


class SentenceEmbedder:
    """Caches sentence embeddings per distinct caption (MiniLM costs ~4 ms a caption on CPU)."""

    def __init__(self, text_encoder=None):
        if text_encoder is None:
            from ..text import MiniLMEncoder
            text_encoder = MiniLMEncoder(max_length=32)
        self.text_encoder = text_encoder
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if todo:
            for c, e in zip(todo, sentence_embeddings(self.text_encoder, todo)):
                self.cache[c] = e
        return torch.stack([self.cache[c] for c in captions])


def _text_embed(text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    if isinstance(text_encoder, SentenceEmbedder):
        return text_encoder(prompts)
    return SentenceEmbedder(text_encoder)(prompts)


def alignment_score(encoder: ImageEncoder, images: Sequence[Image.Image], prompts: Sequence[str],
                    text_encoder=None) -> dict:
    """Cosine similarity between each image's embedding and its prompt's sentence embedding.

    ``text_encoder``: a MiniLM :class:`~snapgen.text.TextEncoder`, a :class:`SentenceEmbedder` (cached), or
    None (loads MiniLM). Returns ``{"mean": float, "per_image": [float, ...]}``.
    """
    if isinstance(prompts, str) or isinstance(images, Image.Image):
        raise ValueError("images and prompts must be lists")
    if len(images) == 0:
        raise ValueError("alignment_score needs at least one image")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they must pair up")
    img = encoder.embed(images)
    txt = _text_embed(text_encoder, prompts).to(img.device, img.dtype)  # the text encoder may sit on a GPU
    if txt.shape[1] != img.shape[1]:
        raise ValueError(f"text embeddings have dim {txt.shape[1]} but the image encoder gives "
                         f"{img.shape[1]}; use the MiniLM text encoder")
    per = (img * txt).sum(-1)
    return {"mean": float(per.mean()), "per_image": [float(v) for v in per]}


# -- data -----------------------------------------------------------------------------------------------
def eval_prompt_captions() -> frozenset[str]:
    """Normalised prompts of every shipped SceneEval set (``src/snapgen/eval/prompts/*.jsonl``): the captions
    the encoder must never train on (issue 20 §2), so its scores on eval prompts are not memorised."""
    import json

    from .training_captions import normalise_caption
    out = set()
    for f in sorted((Path(__file__).resolve().parent / "prompts").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.add(normalise_caption(json.loads(line)["prompt"]))
    return frozenset(out)


def _load_pool(spec: dict, exclude: frozenset[str] = frozenset()) -> tuple[torch.Tensor, list[str]]:
    """The dataset's (image, caption) pairs, minus those whose normalised caption is in ``exclude``."""
    from ..data import build_dataset
    from .training_captions import normalise_caption
    ds = build_dataset(spec)
    imgs, caps = [], []
    for i in range(len(ds)):
        s = ds[i]
        if exclude and normalise_caption(s.caption) in exclude:
            continue
        imgs.append(np.asarray(s.image.convert("RGB"), dtype=np.uint8))
        caps.append(s.caption)
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), caps


def heldout_samples(n: int = 400, seed: int = 1234, resolution: int = 64) -> tuple[list[Image.Image], list[str]]:
    """Held-out pairs: scenes ``val`` + emoji ``test`` (never seen in training), mixed 60/40."""
    from ..data import build_dataset
    ds = build_dataset({"type": "mixed", "length": n, "resolution": resolution, "seed": seed, "sources": [
        {"type": "scenes", "weight": 0.6, "length": 100_000, "split": "val"},
        {"type": "emoji", "weight": 0.4, "split": "test"}]})
    items = [ds[i] for i in range(len(ds))]
    return [s.image for s in items], [s.caption for s in items]


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Small random translations (replicate padding); colours and left/right are left alone."""
    b, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    offs = torch.randint(0, 2 * p + 1, (b, 2), generator=gen)
    return torch.stack([xp[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(offs.tolist())])


def train_image_encoder(out_dir: str | os.PathLike | None = None, steps: int = 2500, batch_size: int = 128,
                        seed: int = 0, pool_size: int = 20000, lr: float = 2e-3,
                        config: ImageEncoderConfig | None = None, text_encoder=None,
                        log_every: int = 100, exclude_eval_prompts: bool = True) -> ImageEncoder:
    """Train the image tower against frozen MiniLM sentence embeddings; deterministic given ``seed``.

    A pool of ``pool_size`` (image, caption) pairs is drawn from scenes + emoji (train splits); each
    distinct caption is embedded once. With ``exclude_eval_prompts`` (default) pairs whose caption is an eval
    prompt (:func:`eval_prompt_captions`, compared after :func:`~snapgen.eval.training_captions.normalise_caption`)
    are dropped from the pool. Saves to ``out_dir`` when given.
    """
    torch.manual_seed(seed)
    config = config or ImageEncoderConfig()
    t0 = time.time()
    pool_x, pool_caps = _load_pool({"type": "mixed", "length": pool_size, "resolution": config.resolution,
                                    "seed": seed, "sources": [dict(s) for s in DEFAULT_TRAIN_SOURCES]},
                                   eval_prompt_captions() if exclude_eval_prompts else frozenset())
    distinct = list(dict.fromkeys(pool_caps))
    index = {c: i for i, c in enumerate(distinct)}
    cap_id = torch.tensor([index[c] for c in pool_caps], dtype=torch.long)
    embedder = text_encoder if isinstance(text_encoder, SentenceEmbedder) else SentenceEmbedder(text_encoder)
    text_table = embedder(distinct).float()
    print(f"pool: {len(pool_caps)} pairs (of {pool_size}; eval prompts excluded: {exclude_eval_prompts}), "
          f"{len(distinct)} distinct captions, "
          f"prepared in {time.time() - t0:.1f}s", flush=True)

    model = ImageEncoder(config)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t1 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(pool_caps), (batch_size,), generator=gen)
        x = _augment(pool_x[idx].float().div(127.5).sub(1.0), gen)
        ids = cap_id[idx]
        txt = text_table[ids]
        img = model(x)
        scale = model.logit_scale.exp()
        logits = scale * img @ txt.t()
        same = (ids[:, None] == ids[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                      - (target * logits.t().log_softmax(1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}  T={1 / scale.item():.4f}  "
                  f"{time.time() - t1:.0f}s", flush=True)
    model.eval()
    print(f"trained {steps} steps in {time.time() - t1:.1f}s", flush=True)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


@torch.no_grad()
def evaluate_encoder(encoder: ImageEncoder, embedder: SentenceEmbedder | None = None, n: int = 400,
                     n_retrieval: int = 100, seed: int = 1234) -> dict:
    """Ceiling (real held-out pairs), floor (shuffled pairs), retrieval top-1 among ``n_retrieval``
    distinct held-out captions (chance = 1/n_retrieval)."""
    embedder = embedder or SentenceEmbedder()
    images, caps = heldout_samples(n, seed=seed, resolution=encoder.config.resolution)
    ceiling = alignment_score(encoder, images, caps, embedder)["mean"]
    perm = np.random.default_rng(seed).permutation(len(caps))
    shuffled = [caps[i] for i in perm]
    floor = alignment_score(encoder, images, shuffled, embedder)["mean"]
    # retrieval: first n_retrieval items with distinct captions
    seen, keep = set(), []
    for i, c in enumerate(caps):
        if c not in seen:
            seen.add(c)
            keep.append(i)
        if len(keep) == n_retrieval:
            break
    img = encoder.embed([images[i] for i in keep])
    txt = embedder([caps[i] for i in keep])
    sims = img @ txt.t()
    top1 = float((sims.argmax(1) == torch.arange(len(keep))).float().mean())
    return {"ceiling": ceiling, "floor": floor, "gap": ceiling - floor, "retrieval_top1": top1,
            "retrieval_n": len(keep)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the contrastive image encoder used for alignment / FD.")
    ap.add_argument("--out", default=str(default_image_encoder_dir()))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pool-size", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    embedder = SentenceEmbedder()
    t = time.time()
    model = train_image_encoder(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                pool_size=args.pool_size, text_encoder=embedder)
    print(f"total training time {time.time() - t:.1f}s; saved to {args.out}")
    r = evaluate_encoder(model, embedder)
    print(f"held-out ceiling (real pairs) {r['ceiling']:.3f}  floor (shuffled) {r['floor']:.3f}  "
          f"gap {r['gap']:.3f}  retrieval top-1 among {r['retrieval_n']} captions {r['retrieval_top1']:.3f} "
          f"(chance {1 / r['retrieval_n']:.3f})")


if __name__ == "__main__":
    main()
