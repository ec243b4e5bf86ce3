"""Text conditioning: frozen caption encoders, their per-caption feature cache, and the trainable
conditioning module (projections + null embeddings for caption drop / classifier-free guidance).

::

    encoder = MiniLMEncoder()                          # frozen, 384-d tokens
    cached = CachedTextEncoder(encoder)                # per-caption memo, save()/load()
    cond = TextConditioning([encoder.dim], out_dim=model.config.text_dim)   # trainable, saved with the model
    text, text_mask = cond([cached.encode(captions)])  # -> model(x, t, {"text": text, "text_mask": text_mask})

``transformers`` is only imported when an :class:`HFTextEncoder` is built.
"""

from .base import TextEncoder, check_captions
from .cache import CachedTextEncoder
from .conditioning import TextConditioning
from .hf import MINILM_PACKAGE, HFTextEncoder, MiniLMEncoder, minilm_path

__all__ = [
           "MINILM_PACKAGE",
           "CachedTextEncoder",
           "HFTextEncoder",
           "MiniLMEncoder",
           "TextConditioning",
           "TextEncoder",
           "check_captions",
           "minilm_path",
]
