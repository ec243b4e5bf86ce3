"""DFM's Laplacian pyramid (:class:`snapgen.nn.pyramid.Pyramid`): it lives in ``snapgen.nn`` because the model side
(:mod:`snapgen.models.multiscale`) needs it and models sit below flow in the layer order (tests/test_layers.py);
imported here too, where the objective and its docs look for it."""

from ..nn.pyramid import Pyramid

__all__ = ["Pyramid"]
