"""``python -m launch``: see :mod:`launch.cli`."""

from .cli import console

console()
