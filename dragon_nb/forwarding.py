"""Prints of runtime processes, shown where their caller is.

A Pool worker or a Process runs on some node, but what it prints belongs under
the notebook cell (or in the terminal) of whoever started it. Its
``sys.stdout``/``sys.stderr`` become a ``ForwardedStream`` that hands text to
the process's own sender; the caller writes what arrives with ``emit``, in the
``contextvars`` context captured when the work was submitted (ipykernel keeps
the cell a print belongs to there).
"""
from __future__ import annotations

import io
import logging
import sys

log = logging.getLogger("dragon_nb.forwarding")


class ForwardedStream(io.TextIOBase):
    """A text stream whose writes go to ``sink(name, text)``."""

    def __init__(self, sink, name: str):
        self.sink = sink
        self.name = name

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.sink(self.name, text)
        return len(text)


def emit(context, stream: str, text: str) -> None:
    """Write ``text`` to this process's stdout or stderr, in ``context`` if given."""
    def write():
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.write(text)
        target.flush()
    try:
        if context is not None:
            context.run(write)
        else:
            write()
    except Exception:
        log.debug("could not write forwarded output", exc_info=True)
