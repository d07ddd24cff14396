"""Every time limit, grace and rate of dragon-nb in one place.

Each role's module imports what it uses from here (and keeps the name, so a
test can still patch it there). The figures are what was measured to work on a
2-core VM that is shared and noisy: raise the limits on a slower machine, not
the rates. Algorithmic sizes (batch and window sizes, spin times) stay with
the code they size.

This module imports nothing, so every layer may use it.
"""

# --- the client's handle ------------------------------------------------------------
DEFAULT_TIMEOUT = 30.0        # how long a request to the head, or a DDict op, may take
KILL_NOWAIT_LOCK_S = 1.0      # a no-wait kill gives up on a handle busy this long

# --- the head -------------------------------------------------------------------------
AGENT_POLL_S = 0.1            # how often the head looks at its agents and deadlines
SHUTDOWN_GRACE_S = 2.0        # agents get this long to stop their children and exit
NODE_TIMEOUT_S = 3.0          # an agent on another host silent this long is lost
SPAWN_TIMEOUT_S = 30.0        # a spawn some node has not answered by then fails whole
KILL_TIMEOUT_S = 5.0          # a kill some node has not confirmed by then fails
PING_S = 1.0                  # how often agents on other hosts hear from the head
JOIN_GRACE_S = 10.0           # more silence allowed to an agent that has just joined

# --- agents ---------------------------------------------------------------------------
JOIN_TIMEOUT_S = 10.0         # a head that does not welcome us by then: wrong key or address
HEAD_TIMEOUT_S = 10.0         # an agent on another host that hears nothing this long stops
OWNER_GRACE_S = 2.0           # an owner with no process left is reported this long, then folded
TELEMETRY_INTERVAL_S = 0.25   # how often an agent publishes its node's figures
STOP_TERM_S = 1.0             # children get this long after SIGTERM, then SIGKILL

# --- TCP links ----------------------------------------------------------------------------
HEARTBEAT_MS = 1000           # on TCP, peers ping each other this often when idle,
HEARTBEAT_TIMEOUT_MS = 10_000  # and drop (then redial) a connection silent this long

# --- pools ----------------------------------------------------------------------------------
TARGET_QUEUED_S = 0.02        # work a worker should hold queued
LIVENESS_S = 0.5              # how often a pool looks at its local workers' pids
EXIT_GRACE_S = 0.2            # results sent just before an exit may still be in flight
TASK_RETRIES = 1              # a chunk lost with its worker runs again at most this often
FLUSH_EVERY_S = 0.005         # a worker sends its results at least this often
IDLE_POLL_MS = 1000           # an idle worker wakes this often to look at its parent
OUTPUT_FLUSH_S = 0.2          # a print shows up in the caller within about this

# --- pipelines ---------------------------------------------------------------------------
BATCH_TARGET_S = 0.005        # aim for about this much work per batch
STAGE_POLL_MS = 200           # a stage worker looks at its control socket this often
PUSH_POLL_MS = 200            # the feeder, blocked on a full stage 0, looks around this often
CLOSE_GRACE_S = 2.0           # close(): stage workers get this long to obey the stop
LINK_REFEEDS = 20             # times a batch may be fed in again after cut links (uncharged)
REFEED_MERGE_S = 1.0          # reports of cut links this close together are one cut

# --- DDict --------------------------------------------------------------------------------
WAIT_GRACE_S = 1.0            # wait_for: how much longer than its timeout to wait
SLICE_S = 0.1                 # longest wait between two liveness checks of a manager
LANE_EXIT_WAIT_S = 1.0        # a manager whose lane closed is given this long to be seen dead
REDIAL_GRACE_S = 1.0          # how long the reply to a request not re-sent is still awaited
DESTROY_EXIT_WAIT_S = 2.0     # destroy: how long managers get to exit before SIGKILL
REFUSALS_DEAD = 3             # a link to a manager refused this often: the manager is gone
PUBLISH_EVERY_S = 0.05        # a manager updates its counters at most this often
IDLE_S = 0.5                  # an idle manager wakes this often

# --- multiprocessing objects and processes (dragon_nb.mp) ------------------------------
HOST_START_S = 30.0           # an object host that has not said where it listens by then failed
CALL_SLICE_S = 0.25           # a blocked call looks at its host's liveness this often
CANCEL_WAIT_S = 2.0           # an interrupted call waits this long to learn what its host did
BYE_GRACE_S = 0.5             # an exit event may overtake the exiting process's last output

# --- front ends -----------------------------------------------------------------------------
REFRESH_S = 0.25              # live views redraw this often
LIVE_FOR_S = 600.0            # a dashboard or DDict view stops refreshing after this long
