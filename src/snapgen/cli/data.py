"""``snapgen data pack | encode``: image sources -> tar shards -> latent shards."""

from __future__ import annotations

import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="data tools: pack a source into WebDataset-style tar shards; encode "
                                           "shards into latent shards (VAE latents + text features, optional "
                                           "aspect buckets)")
    p.add_argument("action", choices=["pack", "encode"])
    p.add_argument("source", help="pack: scenes | emoji | an image folder (image + .txt caption); "
                                  "encode: a folder of image shards")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="pack: samples per shard")
    p.add_argument("--limit", type=int, help="pack at most N samples")
    p.add_argument("--resolution", type=int, default=64,
                   help="square size in pixels; 0 keeps each image's own size (pack a folder for aspect buckets)")
    p.add_argument("--vae", default="models/snapgen-micro",
                   help="encode: an autoencoder folder or a pipeline folder (its vae/)")
    p.add_argument("--text", nargs="+", default=["minilm"],
                   help="encode: text encoder(s): minilm, a local folder, onnx:PATH, paraphrase-minilm-l3; several "
                        "store every encoder's features (train with the same text.encoder list)")
    p.add_argument("--text-max-length", type=int, nargs="+", default=[32],
                   help="one for all text encoders or one per encoder")
    p.add_argument("--buckets", type=int, help="encode: aspect buckets of about BUCKETS^2 pixels each")
    p.add_argument("--multiple", type=int, help="encode: bucket sides are multiples of this (default VAE factor x 4)")
    p.add_argument("--max-ratio", type=float, default=2.0, help="encode: most elongated bucket (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="encode: images per autoencoder batch")
    p.set_defaults(func=cmd_data)


def cmd_data(args) -> int:
    return _data_encode(args) if args.action == "encode" else _data_pack(args)


def _data_pack(args) -> int:
    """A built-in source (scenes, emoji) or an image folder -> WebDataset-style tar shards."""
    from ..data.shards import pack_shards

    src = args.source
    if src in ("scenes", "emoji"):
        from ..data import build_dataset

        spec = {"type": src, "resolution": args.resolution, **({"length": args.limit or 10000} if src == "scenes"
                                                              else {})}
        dataset = build_dataset(spec)
    else:
        from ..data.folder import ImageFolderDataset

        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src} is neither a built-in source (scenes, emoji) nor a folder")
        dataset = ImageFolderDataset(src, resolution=args.resolution or None)
    out = pack_shards(dataset, args.out, args.shard_size, args.limit)
    index = json.loads((out / "index.json").read_text())
    print(f"{index['total']} samples in {len(index['shards'])} shards -> {out}")
    return 0


def _data_encode(args) -> int:
    """Image shards -> latent shards (VAE latents + caption features), optionally in aspect buckets."""
    from ..data.buckets import aspect_buckets
    from ..data.latent_shards import encode_shards
    from ..text.loading import load_text_encoder
    from ..vae import load_autoencoder

    if not os.path.isfile(os.path.join(args.source, "index.json")):
        raise FileNotFoundError(f"{args.source} is not a shard folder (no index.json); pack images first with "
                                f"`snapgen data pack SRC --out {args.source}`")
    vae_dir = args.vae
    if os.path.isfile(os.path.join(vae_dir, "pipeline.json")):  # a pipeline folder: use its autoencoder
        vae_dir = os.path.join(vae_dir, "vae")
    vae = load_autoencoder(vae_dir).eval()
    specs, lengths = list(args.text), list(args.text_max_length)
    text = load_text_encoder(specs[0] if len(specs) == 1 else specs, lengths[0] if len(lengths) == 1 else lengths)
    buckets = None
    if args.buckets:
        factor = int(getattr(vae, "factor", 8))
        multiple = args.multiple or factor * 4  # pixels per Middle-stage token: VAE factor x patch 2 x merge 2
        buckets = aspect_buckets(args.buckets, multiple, args.max_ratio)
        print(f"{len(buckets)} aspect buckets around {args.buckets}^2 px (sides multiples of {multiple}): "
              + ", ".join(f"{h}x{w}" for h, w in buckets))
    out = encode_shards(args.source, args.out, vae, text, buckets=buckets,
                        resolution=None if buckets else (args.resolution or None), batch_size=args.batch_size)
    index = json.loads((out / "index.json").read_text())
    print(f"{index['total']} samples ({index['skipped']} skipped) in {len(index['shards'])} latent shards -> "
          f"{out}; grids {index['sizes']}. Train on them with data.shards: {out}")
    return 0
