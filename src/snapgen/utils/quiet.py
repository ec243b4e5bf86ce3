"""Silence known import-time chatter of optional libraries, exactly, at the import sites that trigger it.

``transformers`` imports ``torchao`` (its quantizer integration) as soon as a model class is loaded, and
``executorch`` imports it too. ``torchao`` then logs one "Failed to load ...so" warning per prebuilt CUDA
extension it cannot load (built for another Python, useless on CPU), and registers two enums with
``torch.utils._pytree.register_constant``, which torch >= 2.13 answers with a deprecation warning each.
None of it concerns snapgen's use of those libraries, and a normal CLI run should print nothing from them.

:func:`quiet_imports` drops exactly those records, from those two loggers, while its block runs, and only
them: other warnings of those loggers, other loggers and Python ``warnings`` pass through unchanged.
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["quiet_imports"]

# logger name -> message prefixes dropped (the start of the format string, before any argument)
KNOWN_CHATTER = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),  # CPU-only torch; shown only if logging is set up
    "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.prefixes))


@contextlib.contextmanager
def quiet_imports():
    """Drop :data:`KNOWN_CHATTER` log records while the block runs (the filters are removed after)."""
    installed = []
    for name, prefixes in KNOWN_CHATTER.items():
        logger, f = logging.getLogger(name), _DropKnown(prefixes)
        logger.addFilter(f)
        installed.append((logger, f))
    try:
        yield
    finally:
        for logger, f in installed:
            logger.removeFilter(f)
