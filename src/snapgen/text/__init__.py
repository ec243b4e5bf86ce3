"""Text conditioning: frozen caption encoders, their per-caption feature cache, and the trainable
conditioning module (projections + null embeddings for caption drop / classifier-free guidance).

::

    encoder = MiniLMEncoder()                          # frozen, 384-d tokens
    cached = CachedTextEncoder(encoder)                # per-caption memo, save()/load()
    cond = TextConditioning([encoder.dim], out_dim=model.config.text_dim)   # trainable, saved with the model
    text, text_mask = cond([cached.encode(captions)])  # -> model(x, t, {"text": text, "text_mask": text_mask})

Several encoders: :class:`MultiTextEncoder` returns one ``(tokens, mask)`` per encoder (the *feature list*
that :func:`encode_features` gives for any encoder and ``TextConditioning`` takes); an ONNX encoder run by
onnxruntime: :class:`snapgen.text.onnx_encoder.OnnxTextEncoder`.

``transformers`` is only imported when an :class:`HFTextEncoder` is built.
"""

from .base import TextEncoder, check_captions
from .cache import CachedTextEncoder
from .conditioning import TextConditioning
from .hf import MINILM_PACKAGE, HFTextEncoder, MiniLMEncoder, minilm_path
from .multi import MultiTextEncoder, encode_features, encoder_list, text_specs

__all__ = [
           "MINILM_PACKAGE",
           "CachedTextEncoder",
           "HFTextEncoder",
           "MiniLMEncoder",
           "MultiTextEncoder",
           "TextConditioning",
           "TextEncoder",
           "check_captions",
           "encode_features",
           "encoder_list",
           "minilm_path",
           "text_specs",
]
