"""The IPython extension for dragon-nb (``%load_ext dragon_nb`` or ``%load_ext kernel_ext``).

It registers ``%dragon`` (the runtime behind the kernel, Pool maps, DDicts,
live views; one subcommand per action, ``%dragon ACTION --help`` for its
options) and ``%%dragon pipeline``, and, under a Jupyter kernel, replaces the
terminal progress bars by live widgets. See ``kernel_ext/magics.py``.
"""
from kernel_ext.magics import load_ipython_extension, unload_ipython_extension

__all__ = ["load_ipython_extension", "unload_ipython_extension"]
