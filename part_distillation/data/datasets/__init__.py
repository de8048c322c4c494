"""Dataset registrations; each is lazy, so importing this package reads no files."""

from . import toyparts  # noqa: F401  (registers toyparts_* lazily)
