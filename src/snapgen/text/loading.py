"""Text encoders by spec string: the one place that maps ``text.encoder`` / ``pipeline.json``'s ``text_encoder`` to
a frozen encoder."""

from __future__ import annotations

__all__ = ["load_text_encoder"]


def load_text_encoder(spec, max_length):
    """The frozen encoder of ``spec``: ``minilm``, a transformers folder (or Hub id), ``onnx:PATH`` or
    ``paraphrase-minilm-l3`` (:mod:`snapgen.text.onnx_encoder`); a list of specs (``max_length`` one int or one per
    spec) gives a :class:`~snapgen.text.MultiTextEncoder`. One spec string gives that encoder itself, as always."""
    from . import MultiTextEncoder, text_specs

    if isinstance(spec, str):
        return _load_one(spec, max_length)
    specs, lengths = text_specs(spec, max_length, "text_encoder")
    return MultiTextEncoder([_load_one(s, m) for s, m in zip(specs, lengths)], specs=specs)


def _load_one(spec: str, max_length: int):
    from . import HFTextEncoder, MiniLMEncoder
    from .onnx_encoder import PARAPHRASE_SPEC, load_onnx_spec

    if spec == "minilm":
        return MiniLMEncoder(max_length=max_length)
    if spec == PARAPHRASE_SPEC or spec.startswith("onnx:"):
        return load_onnx_spec(spec, max_length)
    return HFTextEncoder(spec, max_length=max_length)


