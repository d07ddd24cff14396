"""The node runtime: head, node agents, and the client's handle on them."""
from dragon_nb.runtime.client import (Runtime, get_runtime, on_stop,
                                      register_entry_module, start, stop)

__all__ = ["Runtime", "get_runtime", "on_stop", "register_entry_module", "start", "stop"]
