"""multiprocessing on the dragon-nb runtime: ``Process``, queues, pipes, locks and
shared values whose processes run on the runtime's nodes and whose objects live
in *object hosts* there, so any process of the runtime, on any node or host, can
use them and pass them on (through queues, as arguments, inside a DDict value).

``set_start_method("dragon")`` routes ``multiprocessing``'s names here
(``dragon_nb.mp_compat``). The pieces, one module each:

* ``process``: the ``Popen`` a ``Process`` gets: a node agent starts it;
* ``hub``: how a process hears from those it started (prints, exits);
* ``entry``: what runs in a started Process, around ``Process._bootstrap``;
* ``objects``: an object host's logic (queues, locks, ...: no sockets), its
  requests' arguments checked by signature (``signatures``);
* ``host``: the object host process around it; ``link``: the client side;
* ``queues``, ``synchronize``, ``sharedctypes``, ``connection``: the handles
  users hold, with the stdlib's interfaces.
"""
