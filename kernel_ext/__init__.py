"""The IPython extension for dragon-nb (``%load_ext kernel_ext``).

The full front end (magics for Pool, DDict and pipelines, live widgets) is
its own issue; for now the extension starts and stops the runtime with the
kernel: ``%dragon start [--nodes N]``, ``%dragon stop``, ``%dragon status``.
"""
from kernel_ext.magics import load_ipython_extension, unload_ipython_extension

__all__ = ["load_ipython_extension", "unload_ipython_extension"]
