"""An external diffusers transformer as the teacher of KD and K-DMD (SnapGen++ Sec. 3.1-3.2: the paper's
teacher is Qwen-Image), with its own text encoders, in snapgen's convention (:mod:`.diffusers_families`
documents the conversion of each family; ``docs/conventions.md`` the boundary).

Text side. The teacher conditions on its own text encoders' features of the batch's caption strings,
computed by the family's diffusers pipeline (``encode_prompt``: the exact prompt templates, hidden-state
choices and padding the teacher was trained with). They are computed once per distinct caption and kept
(:meth:`DiffusersTeacher.encode_captions`, on CPU in the teacher's dtype), after which the text encoders are
unloaded: a 7B Qwen2.5-VL or 4.7B T5 then does not sit beside the transformer during training, and a step
costs no text-encoder forward. The trainer's latent cache holds its U distinct captions, so the flow and dmd
tasks encode them all in ``prepare``; a caption seen later (streamed shards) loads the encoders again and
keeps them. A dropped caption (CFG dropout) gets the teacher's negative prompt (``""``; Qwen-Image ``" "``).

Everything is loaded with ``local_files_only``; safetensors weights only.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..utils.quiet import quiet_imports
from .diffusers_families import Family, family_of
from .teacher import Teacher, capture_outputs, match_token_grid, resolve_module

__all__ = ["DiffusersTeacher"]

_NULL = "\x00null"   # the memo key of the negative prompt's features


def _diffusers():
    try:
        with quiet_imports():
            import diffusers
    except ImportError:
        raise ImportError("a diffusers teacher needs diffusers: pip install 'snapgen[diffusers]'") from None
    return diffusers


@contextlib.contextmanager
def _quiet_loading():
    """No load reports, progress bars or import chatter from diffusers / transformers while loading."""
    import transformers

    from ..text.hf import _quiet

    logging = _diffusers().utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with _quiet(transformers):
            yield
    finally:
        logging.set_verbosity(verbosity)


def _read_config(folder: Path, what: str) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json (expected a folder written by "
                                f"save_pretrained)")
    return json.loads(cfg.read_text())


class DiffusersTeacher(Teacher):
    """A diffusers SD3 / Flux / Qwen-Image transformer as a :class:`~snapgen.distill.teacher.Teacher`.

    Args:
        transformer: the loaded diffusers transformer (frozen here).
        components: text component name -> folder (``text_encoder``, ``tokenizer``, ``text_encoder_2``...), loaded
            when captions are encoded.
        feature_tap: module path of the block whose image tokens are the ``"last"`` tap (default: the family's
            last block, ``transformer_blocks.-1``; Flux ``single_transformer_blocks.-1``). Any module path is
            also accepted as a tap name.
        feature_patch: taps are returned on the ``(H / feature_patch, W / feature_patch)`` grid (the student's).
        negative_prompt, max_sequence_length: as the family's pipeline takes them.
        cfg_renorm: rescale the guided velocity per token to the conditional velocity's norm (Qwen-Image's
            pipeline does; default per family).
        guidance: Flux-dev's embedded guidance scale for plain calls (``velocity(guidance=w)`` overrides it).
    """

    def __init__(self, transformer: torch.nn.Module, components: dict[str, Path], *, feature_tap: str | None = None,
                 feature_patch: int | None = None, negative_prompt: str | None = None,
                 max_sequence_length: int | None = None, cfg_renorm: bool | None = None,
                 guidance: float | None = None, name: str = "diffusers teacher"):
        super().__init__()
        self.family: Family = family_of(type(transformer).__name__)
        self.transformer = transformer.eval().requires_grad_(False)
        self.components = {k: Path(v) for k, v in components.items() if v is not None}
        missing = [c for c in self.family.text_components if c not in self.components]
        if missing:
            raise ValueError(f"{name}: a {self.family.transformer_class} teacher needs the text components "
                             f"{list(self.family.text_components)}; missing {missing} (give a pipeline folder as "
                             f"'path' or each folder by name)")
        cfg = transformer.config
        self.latent_channels = self.family.latent_channels(cfg)
        self.patch = self.family.patch(cfg)
        self.feature_patch = int(feature_patch or self.patch)
        self.feature_width = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.feature_tap = feature_tap or self.family.default_tap
        resolve_module(self.transformer, self.feature_tap)  # fail now on a wrong tap, not at the first step
        self.negative_prompt = self.family.negative_prompt if negative_prompt is None else str(negative_prompt)
        self.max_sequence_length = int(max_sequence_length or self.family.max_sequence_length)
        self.cfg_renorm = self.family.cfg_renorm if cfg_renorm is None else bool(cfg_renorm)
        self.guidance = None if guidance is None else float(guidance)
        self.name = name
        self._rows: dict[str, dict[str, torch.Tensor]] = {}
        self._pipe = None
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, transformer: str | os.PathLike | None = None,
                        dtype: torch.dtype = torch.float32, **kw) -> "DiffusersTeacher":
        """A diffusers pipeline folder ``path`` (``transformer/``, ``text_encoder/``, ``tokenizer/``...) and/or
        each component folder by name (``transformer=``, ``text_encoder=``, ``tokenizer_2=``...: these win).
        Other keywords go to the constructor."""
        diffusers = _diffusers()
        root = Path(path) if path is not None else None
        if root is not None and not root.is_dir():
            raise FileNotFoundError(f"diffusers teacher folder {root} does not exist")
        tdir = Path(transformer) if transformer is not None else (root / "transformer" if root else None)
        if tdir is None:
            raise ValueError("a diffusers teacher needs 'path' (a pipeline folder) or 'transformer' (a folder)")
        family = family_of(_read_config(tdir, "teacher transformer").get("_class_name"), f"teacher {tdir}")
        names = family.text_components + family.optional_components
        unknown = sorted(set(kw) - set(names) - {"feature_tap", "feature_patch", "negative_prompt",
                                                 "max_sequence_length", "cfg_renorm", "guidance", "name"})
        if unknown:
            raise ValueError(f"unknown options for a {family.transformer_class} teacher: {unknown}; components "
                             f"are {list(names)}")
        components = {}
        for n in names:
            given = kw.pop(n, None)
            folder = Path(given) if given is not None else (root / n if root is not None else None)
            if folder is not None and folder.is_dir():
                components[n] = folder
            elif given is not None:
                raise FileNotFoundError(f"teacher {n} folder {folder} does not exist")
        with _quiet_loading():
            model = getattr(diffusers, family.transformer_class).from_pretrained(
                tdir, local_files_only=True, use_safetensors=True, torch_dtype=dtype)
        return cls(model, components, name=kw.pop("name", str(root or tdir)), **kw)

    # --- the text side ---------------------------------------------------------------------------------
    needs_captions = True

    def prepare_captions(self, captions: Sequence[str]) -> None:
        """Encode the data's distinct captions once, then unload the text encoders."""
        self.encode_captions(captions, release=True)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def _load_text(self):
        import transformers

        diffusers = _diffusers()
        parts = {}
        with _quiet_loading():
            for n, folder in self.components.items():
                if n.startswith("tokenizer"):
                    parts[n] = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
                    continue
                arch = (_read_config(folder, f"teacher {n}").get("architectures") or [None])[0]
                if arch is None or not hasattr(transformers, arch):
                    raise ValueError(f"teacher {n} folder {folder}: config.json names no transformers model class "
                                     f"(architectures: {arch!r})")
                parts[n] = getattr(transformers, arch).from_pretrained(
                    folder, local_files_only=True, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        for n in self.family.optional_components:
            parts.setdefault(n, None)
        self._pipe = getattr(diffusers, self.family.pipeline_class)(transformer=self.transformer, vae=None,
                                                                     scheduler=None, **parts)

    def release_text_encoders(self) -> None:
        """Unload the text encoders (the memo of encoded captions stays)."""
        self._pipe = None

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], batch_size: int = 32, release: bool = True) -> None:
        """Encode the captions not yet known (and the negative prompt) with the teacher's text encoders."""
        todo = [c for c in dict.fromkeys([_NULL, *captions]) if c not in self._rows]
        if not todo:
            return
        if self._pipe is None:
            self._load_text()
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            text = [self.negative_prompt if c == _NULL else c for c in chunk]
            rows = self.family.encode(self._pipe, text, self.device, self.max_sequence_length)
            for c, row in zip(chunk, rows):
                self._rows[c] = {k: v.detach().cpu() for k, v in row.items()}
        if release:
            self.release_text_encoders()

    def _batch(self, keys: list[str], length: int | None = None) -> dict:
        rows = [self._rows[k] for k in keys]
        lengths = [r["encoder_hidden_states"].shape[0] for r in rows]
        L = max(lengths + [length or 0])
        if not self.family.masked and (len(set(lengths)) > 1 or L != lengths[0]):
            raise ValueError(f"{self.family.transformer_class} text features of different lengths "
                             f"{sorted(set(lengths))} "
                             f"cannot be padded (the model takes no text mask)")
        dev, dt = self.device, self.dtype
        emb = torch.zeros(len(rows), L, rows[0]["encoder_hidden_states"].shape[1], device=dev, dtype=dt)
        for i, r in enumerate(rows):
            emb[i, :lengths[i]] = r["encoder_hidden_states"].to(dev, dt)
        cond = {"encoder_hidden_states": emb}
        if self.family.masked:
            n = torch.tensor(lengths, device=dev)
            cond["encoder_hidden_states_mask"] = torch.arange(L, device=dev)[None] < n[:, None]
        if "pooled_projections" in rows[0]:
            cond["pooled_projections"] = torch.stack([r["pooled_projections"] for r in rows]).to(dev, dt)
        return cond

    def condition(self, captions, feats=None, drop=None) -> dict:
        """The teacher's conditioning of the batch's caption strings; a caption dropped for every student text
        encoder (``drop``: a ``(B,)`` bool tensor or one per encoder) gets the negative prompt."""
        if captions is None:
            raise ValueError("a diffusers teacher conditions on caption strings: the batch carries none (the latent "
                             "cache or shard lost its captions; rebuild it)")
        captions = list(captions)
        missing = [c for c in captions if c not in self._rows]
        if missing:
            self.encode_captions(missing, release=False)
        cond = self._batch(captions, self._rows[_NULL]["encoder_hidden_states"].shape[0])
        if drop is None:
            return cond
        drops = [drop] if torch.is_tensor(drop) else list(drop)
        dropped = torch.stack([torch.as_tensor(d, dtype=torch.bool).to(self.device) for d in drops]).all(0)
        null = self.null_condition(len(captions), cond)  # padded to the same length: selected on the device
        return {k: torch.where(dropped.view(-1, *[1] * (v.dim() - 1)), null[k], v) for k, v in cond.items()}

    def null_condition(self, batch_size: int, like: dict) -> dict:
        if _NULL not in self._rows:
            self.encode_captions([], release=False)
        return self._batch([_NULL] * batch_size, like["encoder_hidden_states"].shape[1])

    # --- calls -----------------------------------------------------------------------------------------
    def _image_tokens(self, name: str, out, n: int) -> torch.Tensor:
        """The image-token stream of a hooked block's output: diffusers' dual-stream blocks return
        ``(encoder_hidden_states, hidden_states)``, so the last ``(B, n, D)`` tensor; a single-stream block over
        ``[text; image]`` tokens gives its last ``n`` tokens."""
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(o) and o.dim() == 3]
        exact = [o for o in outs if o.shape[1] == n]
        if exact:
            return exact[-1]
        longer = [o for o in outs if o.shape[1] > n]
        if longer:
            return longer[-1][:, -n:]
        raise ValueError(f"teacher tap {name!r} gives no image tokens ({n} expected; outputs "
                         f"{[tuple(o.shape) for o in outs]}): choose a transformer block as feature_tap")

    def _call(self, x, t, cond, features=(), guidance=None):
        B, C, H, W = x.shape
        if C != self.latent_channels:
            raise ValueError(f"the teacher denoises {self.latent_channels}-channel latents, got {C} channels")
        if H % self.patch or W % self.patch:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the teacher's patch {self.patch}")
        dt = self.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B).to(dt)
        cond = {k: v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        g = guidance if guidance is not None else self.guidance
        g = None if g is None else torch.full((B,), float(g), device=x.device, dtype=dt)
        grid = (H // self.patch, W // self.patch)
        taps = {f: resolve_module(self.transformer, self.feature_tap if f == "last" else f) for f in features}
        with capture_outputs(taps, lambda name, o: self._image_tokens(name, o, grid[0] * grid[1])) as cap:
            v = self.family.call(self.transformer, x.to(dt), t, cond, g).float()
        if not features:
            return v
        not_run = [f for f in features if f not in cap.outputs]
        if not_run:
            raise ValueError(f"teacher taps {not_run} did not run in the forward pass")
        dst = (H // self.feature_patch, W // self.feature_patch)
        return v, {f: match_token_grid(cap.outputs[f].float(), grid, dst) for f in features}

    def forward(self, x, t, cond, *, features=()):
        return self._call(x, t, cond, tuple(features))

    def velocity(self, x, t, cond, guidance: float = 1.0, uncond: dict | None = None) -> torch.Tensor:
        """The guided velocity. Flux-dev (guidance-distilled): ``guidance`` is its embedded guidance, one call.
        Otherwise true CFG ``v_u + w (v_c - v_u)`` in one batch of 2B; with ``cfg_renorm`` (Qwen-Image) rescaled
        per token (2x2 patch, all channels) to the conditional velocity's norm, as its pipeline does."""
        if getattr(self.transformer.config, "guidance_embeds", False):
            return self._call(x, t, cond, guidance=guidance)
        if uncond is None or guidance == 1.0:
            return self._call(x, t, cond)
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        both = {k: torch.cat([cond[k], uncond[k]]) if torch.is_tensor(cond[k]) else cond[k] for k in cond}
        v_c, v_u = self._call(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        v = v_u + guidance * (v_c - v_u)
        if self.cfg_renorm:
            def norm(u):  # per packed token: over channels and the 2x2 patch
                C, H, W = u.shape[1:]
                return u.reshape(B, C, H // 2, 2, W // 2, 2).pow(2).sum((1, 3, 5), keepdim=True).sqrt()
            ratio = norm(v_c) / norm(v).clamp_min(1e-12)
            C, H, W = v.shape[1:]
            v = (v.reshape(B, C, H // 2, 2, W // 2, 2) * ratio).reshape(B, C, H, W)
        return v

    def train(self, mode: bool = True):
        """The teacher stays in eval mode whatever its parent module does."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"family={self.family.name}, latent_channels={self.latent_channels}, patch={self.patch}, "
                f"feature_tap={self.feature_tap!r}, feature_width={self.feature_width}, "
                f"feature_patch={self.feature_patch}, captions={len(self._rows)}")
