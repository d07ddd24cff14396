"""Every exception dragon-nb raises on purpose, under one base.

``except dragon_nb.DragonNbError`` catches anything the runtime, a pool, a
pipeline or a DDict reports; each class also keeps the built-in base a user of
the stdlib or of Dragon already catches (a lost worker is a ``RuntimeError``
as in ``concurrent.futures``, a missing DDict key a ``KeyError``, a timeout a
``TimeoutError``), and the DDict's carry Dragon's names. Argument mistakes are
not here: they are the built-in ``TypeError`` and ``ValueError`` (see
``checks.py``), as in the stdlib.

This module imports nothing of dragon-nb's, so every layer may raise from it.
"""
from __future__ import annotations

import reprlib


class DragonNbError(Exception):
    """The base of every error dragon-nb raises on purpose."""


# --- the runtime -----------------------------------------------------------------------
class RuntimeStoppedError(DragonNbError, RuntimeError):
    """The runtime was stopped, or its head exited: nothing can be asked of it."""


class RuntimeRequestError(DragonNbError, RuntimeError):
    """The head refused or could not carry out a request (a spawn on a lost node,
    a kill no agent confirmed, ...); the message says which and why."""


class RuntimeTimeoutError(DragonNbError, TimeoutError):
    """The head did not answer in time, or a node's figures did not come."""


class RuntimeRunningError(DragonNbError, RuntimeError):
    """A runtime is already running in this process: ``dragon_nb.stop()`` it first."""


# --- pools -------------------------------------------------------------------------------
class WorkerLostError(DragonNbError, RuntimeError):
    """A worker died while running a chunk that had already been retried."""


class CallCancelledError(DragonNbError, RuntimeError):
    """The call was cancelled (an interrupt while waiting, or ``close()`` of an imap)."""


class PoolBrokenError(DragonNbError, RuntimeError):
    """The pool cannot run tasks (its initializer failed, or its runtime stopped)."""


class TaskExitError(DragonNbError, RuntimeError):
    """A task raised SystemExit or KeyboardInterrupt: reported, not obeyed, so it
    neither ends the worker nor the caller that receives it."""


# --- pipelines ---------------------------------------------------------------------------
class PipelineError(DragonNbError, RuntimeError):
    """The pipeline cannot go on: a stage worker died, a link kept failing, or it
    was closed."""


# --- multiprocessing objects on the runtime (dragon_nb.mp) -----------------------------
class SharedObjectError(DragonNbError, RuntimeError):
    """A queue, lock, pipe or shared value of the runtime cannot be used: it was
    removed (no handle to it was left), or its host is gone."""


class ObjectHostLostError(SharedObjectError):
    """The object host of a queue, lock, pipe or shared value is gone, with
    everything it held: its node was lost, or it was killed."""


# --- DDict (Dragon's names, from ``dragon.data.ddict``) ---------------------------------
class DDictError(DragonNbError):
    """Anything that went wrong in a DDict operation."""


class DDictKeyError(DDictError, KeyError):
    """The key is not in the DDict."""

    def __init__(self, key, where: str = ""):
        KeyError.__init__(self, key)
        self.key = key
        self.where = where

    def __str__(self):
        return f"{reprlib.repr(self.key)} is not in the DDict{self.where}"


class DDictFullError(DDictError):
    """The value does not fit in its manager's share of ``total_mem``; nothing
    was stored, and what the manager held before is intact."""


class DDictTimeoutError(DDictError, TimeoutError):
    """A manager did not answer within the DDict's timeout."""


__all__ = [name for name, value in list(globals().items())
           if isinstance(value, type) and issubclass(value, DragonNbError)]
