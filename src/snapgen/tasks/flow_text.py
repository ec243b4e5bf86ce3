"""The flow task's text side: ``text.encoder`` as one spec or a list (several encoders, SnapGen++), their widths
inferred without loading them where possible, and the check that a latent cache holds their features."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["FlowText"]


class FlowText:
    """Mixin of :class:`~snapgen.tasks.flow.FlowTask`: sets ``text_specs`` / ``text_max_lengths`` (lists, one
    per encoder), ``text_spec`` / ``text_max_length`` (a str / int for one encoder, as before; lists for
    several: what ``pipeline.json`` records) and ``drop_probs``."""

    def _read_text_config(self, text: dict) -> None:
        """``text.encoder``: one spec (the historical form: ``text_spec`` a str, ``text_max_length`` an int) or a
        list (``text.max_length`` / ``text.drop_prob``: one value for all encoders or one per encoder)."""
        from ..text import text_specs

        spec, max_length = text.get("encoder", "minilm"), text.get("max_length", 32)
        if not isinstance(max_length, (list, tuple)):
            max_length = int(max_length)
        self.text_specs, self.text_max_lengths = text_specs(spec, max_length, "text.encoder")
        single = isinstance(spec, str)
        self.text_spec = spec if single else list(self.text_specs)          # what pipeline.json records
        self.text_max_length = self.text_max_lengths[0] if single else list(self.text_max_lengths)
        drop = text.get("drop_prob", 0.1)
        drops = list(drop) if isinstance(drop, (list, tuple)) else [drop] * len(self.text_specs)
        if len(drops) != len(self.text_specs):
            raise ValueError(f"text.drop_prob lists {len(drops)} probabilities for {len(self.text_specs)} text "
                             f"encoders; give one float for all or one per encoder")
        self.drop_probs = [float(p) for p in drops]
        self.drop_prob = self.drop_probs[0]

    def _encoder_dims(self) -> list[int]:
        if self._text_encoder is not None:
            from ..text import encoder_list

            dims = [int(e.dim) for e in encoder_list(self._text_encoder)]
            if len(dims) != len(self.text_specs):
                raise ValueError(f"the text_encoder object has {len(dims)} encoder(s), text.encoder lists "
                                 f"{len(self.text_specs)}")
            return dims
        return [self._spec_dim(s, m) for s, m in zip(self.text_specs, self.text_max_lengths)]

    @staticmethod
    def _spec_dim(spec: str, max_length: int) -> int:
        if spec == "minilm":
            return 384
        from ..text.onnx_encoder import PARAPHRASE_SPEC

        if spec == PARAPHRASE_SPEC or spec.startswith("onnx:"):  # small, CPU: load it and read its width
            from ..text.loading import load_text_encoder

            return int(load_text_encoder(spec, max_length).dim)
        cfg_file = Path(spec) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"text encoder folder {spec} has no config.json")
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)
        for key in ("hidden_size", "d_model", "dim"):
            if key in c:
                return int(c[key])
        raise ValueError(f"cannot tell the hidden size of the text encoder in {spec}")

    def _check_cache(self, cache: dict, path: Path) -> None:
        """The cache holds this run's encoders' features: their count (and, for several, specs and max
        lengths: :func:`~snapgen.data.latent_cache.check_cache_encoders`) and widths."""
        from ..data.latent_cache import check_cache_encoders

        check_cache_encoders(cache, path, self.text_specs, self.text_max_lengths)
        for i, ((tokens, _), dim) in enumerate(zip(cache["text_features"], self.cond_kwargs["encoder_dims"])):
            if tokens.shape[-1] != dim:
                which = "" if len(self.text_specs) == 1 else f" of encoder {i} ({self.text_specs[i]})"
                raise ValueError(f"latent cache {path} holds {tokens.shape[-1]}-d text features{which} but the "
                                 f"text encoder gives {dim}; rebuild the cache")
