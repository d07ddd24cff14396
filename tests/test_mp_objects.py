"""The object host's logic (dragon_nb.mp.objects), as a specification: each test
is one behaviour of a queue, lock, semaphore, condition, event, barrier or
buffer, or of the table around them. A fake clock, no sleeps, no sockets."""
import itertools

import pytest

from dragon_nb.mp.objects import (ACTION, BROKEN, CANCELLED, ERROR, GONE, OK, TIMEOUT,
                                  Caller, ObjectTable)

A, B, C = (Caller(name, 1, ("node0", pid, "space", 0.0)) for name, pid in
           (("a", 11), ("b", 12), ("c", 13)))
A2 = Caller("a", 2, A.proc)                   # another thread of a's process


class Env:
    """A table, a clock to advance, processes to kill, and every answer seen."""

    def __init__(self):
        self.now, self.dead, self.answers = 0.0, set(), {}
        self.table = ObjectTable(alive=lambda proc: proc not in self.dead,
                                 clock=lambda: self.now)
        self.tokens = itertools.count(1)

    def feed(self, dones):
        for done in dones:
            assert done.token not in self.answers, f"{done.token} answered twice"
            self.answers[done.token] = (done.status, done.value)
        return dones

    def call(self, who, oid, method, *args, timeout=None):
        """-> the call's token; its answer, once there is one, in answers."""
        token = next(self.tokens)
        self.feed(self.table.request(token, who, oid, method, args, timeout))
        return token

    def now_(self, who, oid, method, *args, timeout=None):
        """A call that must complete at once -> (status, value)."""
        token = self.call(who, oid, method, *args, timeout=timeout)
        assert token in self.answers, f"{method} parked"
        return self.answers[token]

    def of(self, token):
        return self.answers.get(token)            # None: still parked

    def tick(self, seconds):
        self.now += seconds
        return self.feed(self.table.expire())

    def make(self, kind, **params):
        return self.table.create(kind, params)


@pytest.fixture
def env():
    return Env()


# -- queues ------------------------------------------------------------------------------
def test_items_come_out_in_the_order_they_went_in(env):
    q = env.make("queue")
    for item in (b"1", b"2", b"3"):
        assert env.now_(A, q, "put", item) == (OK, None)
    assert [env.now_(B, q, "get") for _ in range(3)] == [(OK, b"1"), (OK, b"2"), (OK, b"3")]
    assert env.now_(B, q, "empty") == (OK, True)


def test_parked_getters_are_served_first_come_first_served(env):
    q = env.make("queue")
    g1, g2 = env.call(B, q, "get"), env.call(C, q, "get")
    assert env.of(g1) is None and env.of(g2) is None
    env.call(A, q, "put", b"x")
    assert env.of(g1) == (OK, b"x") and env.of(g2) is None
    env.call(A, q, "put", b"y")
    assert env.of(g2) == (OK, b"y")
    assert env.now_(A, q, "qsize") == (OK, 0)


def test_a_put_on_a_full_queue_waits_for_a_get_to_free_a_slot(env):
    q = env.make("queue", maxsize=1)
    env.now_(A, q, "put", b"first")
    second = env.call(A, q, "put", b"second")
    assert env.of(second) is None and env.now_(B, q, "full") == (OK, True)
    assert env.now_(B, q, "get") == (OK, b"first")
    assert env.of(second) == (OK, None)
    assert env.now_(B, q, "get") == (OK, b"second")


def test_a_get_times_out_at_its_deadline(env):
    q = env.make("queue")
    get = env.call(B, q, "get", timeout=5)
    assert env.table.next_deadline() == 5.0
    env.tick(4.9)
    assert env.of(get) is None
    env.tick(0.2)
    assert env.of(get) == (TIMEOUT, None)
    assert env.table.next_deadline() is None and env.table.stats()["parked"] == 0
    env.call(A, q, "put", b"x")                   # nobody takes it: it stays
    assert env.now_(B, q, "qsize") == (OK, 1)


def test_a_cancelled_get_is_answered_cancelled_and_takes_nothing(env):
    q = env.make("queue")
    get = env.call(B, q, "get", timeout=5)
    assert env.feed(env.table.cancel(get)) == [(get, CANCELLED, None)]
    assert env.table.cancel(get) == [] and env.table.next_deadline() is None
    env.call(A, q, "put", b"x")
    assert env.now_(A, q, "qsize") == (OK, 1)


def test_timeout_zero_does_not_wait(env):
    q = env.make("queue", maxsize=1)
    assert env.now_(B, q, "get", timeout=0) == (TIMEOUT, None)
    env.now_(A, q, "put", b"x")
    assert env.now_(A, q, "put", b"y", timeout=0) == (TIMEOUT, None)
    assert env.now_(A, q, "qsize") == (OK, 1)


def test_unget_puts_back_at_the_front_even_when_full(env):
    q = env.make("queue", maxsize=1)
    env.now_(A, q, "put", b"next")
    assert env.now_(B, q, "unget", b"served") == (OK, None)
    assert env.now_(B, q, "qsize") == (OK, 2)
    assert [env.now_(B, q, "get") for _ in range(2)] == [(OK, b"served"), (OK, b"next")]
    getter = env.call(C, q, "get")
    env.call(B, q, "unget", b"back")
    assert env.of(getter) == (OK, b"back")


def test_poll_waits_for_an_item_and_takes_none(env):
    q = env.make("queue")
    assert env.now_(B, q, "poll", timeout=0) == (TIMEOUT, None)
    poll, get = env.call(B, q, "poll"), env.call(C, q, "get")
    env.call(A, q, "put", b"x")                                # straight to the getter
    assert env.of(get) == (OK, b"x") and env.of(poll) is None
    env.call(A, q, "put", b"y")
    assert env.of(poll) == (OK, True)
    assert env.now_(B, q, "qsize") == (OK, 1)


def test_join_waits_for_every_put_to_be_task_done(env):
    q = env.make("queue", joinable=True)
    env.call(A, q, "put", b"1")
    env.call(A, q, "put", b"2")
    join = env.call(C, q, "join")
    env.now_(B, q, "get")
    assert env.now_(B, q, "task_done") == (OK, None) and env.of(join) is None
    env.now_(B, q, "task_done")
    assert env.of(join) == (OK, None)
    assert env.now_(C, q, "join") == (OK, None)
    assert env.now_(B, q, "task_done") == (ERROR, "task_done() called too many times")


def test_task_done_and_join_need_a_joinable_queue(env):
    q = env.make("queue")
    assert env.now_(B, q, "task_done")[0] == ERROR
    assert env.now_(B, q, "join")[0] == ERROR


# -- locks and semaphores ------------------------------------------------------------
def test_a_released_lock_goes_to_the_first_parked_acquirer(env):
    lock = env.make("lock")
    assert env.now_(A, lock, "acquire") == (OK, True)
    b, c = env.call(B, lock, "acquire"), env.call(C, lock, "acquire")
    env.call(A, lock, "release")
    assert env.of(b) == (OK, True) and env.of(c) is None
    assert env.now_(A, lock, "owner") == (OK, ("b", 1))
    env.call(B, lock, "release")
    assert env.of(c) == (OK, True)


def test_an_acquire_times_out(env):
    lock = env.make("lock")
    env.now_(A, lock, "acquire")
    b = env.call(B, lock, "acquire", timeout=1)
    env.tick(1)
    assert env.of(b) == (TIMEOUT, None)
    env.call(A, lock, "release")
    assert env.now_(A, lock, "owner") == (OK, None)


def test_a_plain_lock_may_be_released_by_anyone_but_only_once(env):
    lock = env.make("lock")
    env.now_(A, lock, "acquire")
    assert env.now_(B, lock, "release") == (OK, None)
    assert env.now_(B, lock, "release") == (ERROR, "semaphore or lock released too many times")


def test_a_plain_lock_is_not_reentrant(env):
    lock = env.make("lock")
    env.now_(A, lock, "acquire")
    assert env.now_(A, lock, "acquire", timeout=0) == (TIMEOUT, None)
    assert env.now_(A, lock, "count") == (OK, 1) and env.now_(A, lock, "is_mine") == (OK, True)


def test_an_rlock_counts_its_owner_thread_and_refuses_others(env):
    lock = env.make("lock", recursive=True)
    env.now_(A, lock, "acquire")
    env.now_(A, lock, "acquire")
    assert env.now_(A, lock, "count") == (OK, 2)
    assert env.now_(A, lock, "is_mine") == (OK, True)
    assert env.now_(A2, lock, "is_mine") == (OK, False)      # same process, other thread
    assert env.now_(A2, lock, "release") == (ERROR, "cannot release un-acquired lock")
    b = env.call(B, lock, "acquire")
    env.call(A, lock, "release")
    assert env.of(b) is None and env.now_(A, lock, "count") == (OK, 1)
    env.call(A, lock, "release")
    assert env.of(b) == (OK, True) and env.now_(B, lock, "owner") == (OK, ("b", 1))


def test_a_semaphore_counts_and_wakes_a_parked_acquirer(env):
    sem = env.make("semaphore", value=1)
    assert env.now_(A, sem, "acquire") == (OK, True)
    b = env.call(B, sem, "acquire")
    assert env.of(b) is None and env.now_(A, sem, "get_value") == (OK, 0)
    env.call(A, sem, "release")
    assert env.of(b) == (OK, True) and env.now_(A, sem, "get_value") == (OK, 0)
    env.call(A, sem, "release")
    env.call(A, sem, "release")
    assert env.now_(A, sem, "get_value") == (OK, 2)           # unbounded: above the initial


def test_a_bounded_semaphore_refuses_a_release_above_its_initial_value(env):
    sem = env.make("semaphore", value=1, bounded=True)
    assert env.now_(A, sem, "release") == (ERROR, "semaphore or lock released too many times")
    assert env.now_(A, sem, "get_value") == (OK, 1)


# -- conditions ------------------------------------------------------------------------
def test_wait_gives_the_lock_up_and_notify_gives_it_back_with_its_count(env):
    lock = env.make("lock", recursive=True)
    cond = env.make("condition", lock=lock)
    env.now_(A, lock, "acquire")
    env.now_(A, lock, "acquire")
    wait = env.call(A, cond, "wait")
    assert env.of(wait) is None and env.now_(B, lock, "acquire") == (OK, True)
    assert env.now_(B, cond, "notify") == (OK, None)
    assert env.of(wait) is None                                # B still holds the lock
    env.call(B, lock, "release")
    assert env.of(wait) == (OK, True)
    assert env.now_(A, lock, "count") == (OK, 2) and env.now_(A, lock, "is_mine") == (OK, True)


def test_notify_n_and_notify_all_wake_waiters_in_order(env):
    lock = env.make("lock")
    cond = env.make("condition", lock=lock)
    waits = []
    for who in (A, B, C):
        env.now_(who, lock, "acquire")
        waits.append(env.call(who, cond, "wait"))
    env.now_(A2, lock, "acquire")
    assert env.now_(A2, cond, "n_waiting") == (OK, 3)
    env.now_(A2, cond, "notify", 2)
    assert env.now_(A2, cond, "n_waiting") == (OK, 1)          # the other two want the lock
    env.now_(A2, lock, "release")
    assert env.of(waits[0]) == (OK, True) and env.of(waits[1]) is None
    env.now_(A, lock, "release")
    assert env.of(waits[1]) == (OK, True) and env.of(waits[2]) is None
    env.now_(B, cond, "notify_all")
    env.now_(B, lock, "release")
    assert env.of(waits[2]) == (OK, True)


def test_a_timed_out_wait_takes_the_lock_back_then_answers_false(env):
    lock = env.make("lock")
    cond = env.make("condition", lock=lock)
    env.now_(A, lock, "acquire")
    wait = env.call(A, cond, "wait", timeout=1)
    env.now_(B, lock, "acquire")
    env.tick(2)
    assert env.of(wait) is None                                # waits for B's release
    assert env.table.next_deadline() is None                   # no deadline for the lock
    env.call(B, lock, "release")
    assert env.of(wait) == (OK, False) and env.now_(A, lock, "is_mine") == (OK, True)


def test_wait_and_notify_need_the_lock(env):
    lock = env.make("lock")
    cond = env.make("condition", lock=lock)
    assert env.now_(A, cond, "wait") == (ERROR, "cannot wait on un-acquired lock")
    env.now_(B, lock, "acquire")
    assert env.now_(A, cond, "notify") == (ERROR, "cannot notify on un-acquired lock")
    assert env.now_(A, cond, "notify_all") == (ERROR, "cannot notify on un-acquired lock")
    with pytest.raises(ValueError, match="not a lock"):
        env.make("condition", lock=env.make("event"))


# -- events ------------------------------------------------------------------------------
def test_an_event_wait_returns_when_set_or_false_at_its_deadline(env):
    ev = env.make("event")
    wait = env.call(A, ev, "wait")
    env.call(B, ev, "set")
    assert env.of(wait) == (OK, True) and env.now_(A, ev, "is_set") == (OK, True)
    assert env.now_(A, ev, "wait") == (OK, True)
    env.now_(B, ev, "clear")
    late = env.call(A, ev, "wait", timeout=3)
    env.tick(3)
    assert env.of(late) == (OK, False) and env.now_(A, ev, "is_set") == (OK, False)


# -- barriers ----------------------------------------------------------------------------
def test_a_barrier_lets_all_through_when_the_last_arrives(env):
    bar = env.make("barrier", parties=3)
    a, b = env.call(A, bar, "wait"), env.call(B, bar, "wait")
    assert env.of(a) is None and env.now_(A, bar, "n_waiting") == (OK, 2)
    assert env.now_(C, bar, "wait") == (OK, 2)
    assert (env.of(a), env.of(b)) == ((OK, 0), (OK, 1))
    assert env.now_(A, bar, "n_waiting") == (OK, 0)
    again = env.call(A, bar, "wait")                           # a new generation
    assert env.of(again) is None


def test_the_last_runs_the_action_then_all_go_on(env):
    bar = env.make("barrier", parties=2, action=True)
    a = env.call(A, bar, "wait")
    assert env.now_(B, bar, "wait") == (ACTION, 1)
    assert env.of(a) is None
    early = env.call(C, bar, "wait")                           # arrives during the action
    assert env.now_(B, bar, "action_done", True) == (OK, None)
    assert env.of(a) == (OK, 0) and env.of(early) is None      # next generation
    assert env.now_(A, bar, "n_waiting") == (OK, 1)


def test_waiters_do_not_time_out_while_the_action_runs(env):
    bar = env.make("barrier", parties=2, action=True)
    a = env.call(A, bar, "wait", timeout=1)
    env.now_(B, bar, "wait")
    env.tick(5)
    assert env.of(a) is None and env.now_(A, bar, "broken") == (OK, False)
    env.call(B, bar, "action_done", True)
    assert env.of(a) == (OK, 0)


def test_a_failed_action_breaks_the_barrier(env):
    bar = env.make("barrier", parties=2, action=True)
    a = env.call(A, bar, "wait")
    env.now_(B, bar, "wait")
    assert env.now_(B, bar, "action_done", False) == (OK, None)
    assert env.of(a) == (BROKEN, None) and env.now_(A, bar, "broken") == (OK, True)
    assert env.now_(C, bar, "wait") == (BROKEN, None)


def test_a_timed_out_wait_breaks_the_barrier_for_all(env):
    bar = env.make("barrier", parties=3)
    a, b = env.call(A, bar, "wait", timeout=1), env.call(B, bar, "wait")
    env.tick(1)
    assert (env.of(a), env.of(b)) == ((BROKEN, None), (BROKEN, None))
    assert env.now_(C, bar, "wait") == (BROKEN, None)


def test_the_barrier_timeout_applies_to_waits_without_their_own(env):
    bar = env.make("barrier", parties=2, timeout=2.0)
    a = env.call(A, bar, "wait")
    assert env.table.next_deadline() == 2.0
    env.tick(2)
    assert env.of(a) == (BROKEN, None)


def test_a_cancelled_wait_breaks_the_barrier(env):
    bar = env.make("barrier", parties=3)
    a, b = env.call(A, bar, "wait"), env.call(B, bar, "wait")
    env.feed(env.table.cancel(a))
    assert (env.of(a), env.of(b)) == ((CANCELLED, None), (BROKEN, None))
    assert env.table.cancel(a) == []                           # no longer parked


def test_reset_breaks_the_waiters_and_leaves_the_barrier_usable(env):
    bar = env.make("barrier", parties=2)
    a = env.call(A, bar, "wait")
    env.now_(C, bar, "reset")
    assert env.of(a) == (BROKEN, None) and env.now_(C, bar, "broken") == (OK, False)
    b = env.call(B, bar, "wait")
    assert env.now_(A, bar, "wait") == (OK, 1) and env.of(b) == (OK, 0)


def test_abort_breaks_the_barrier(env):
    bar = env.make("barrier", parties=2)
    a = env.call(A, bar, "wait")
    env.now_(C, bar, "abort")
    assert env.of(a) == (BROKEN, None) and env.now_(C, bar, "broken") == (OK, True)
    assert env.now_(C, bar, "parties") == (OK, 2)


# -- buffers -----------------------------------------------------------------------------
def test_a_buffer_reads_and_writes_bytes_in_range(env):
    buf = env.make("buffer", size=4, initial=b"abcd")
    assert env.now_(A, buf, "read", 1, 3) == (OK, b"bc")
    assert env.now_(A, buf, "write", 2, b"XY") == (OK, None)
    assert env.now_(B, buf, "read", 0, 4) == (OK, b"abXY")
    assert env.now_(A, buf, "write", 3, b"XY")[0] == ERROR
    assert env.now_(A, buf, "read", 2, 9)[0] == ERROR
    assert env.now_(A, buf, "read", 0, 4) == (OK, b"abXY")
    assert env.now_(A, env.make("buffer", size=3), "read", 0, 3) == (OK, b"\0\0\0")
    assert env.now_(A, buf, "size") == (OK, 4)


# -- processes that died ------------------------------------------------------------------
def test_a_dead_parked_getter_is_skipped_and_the_item_goes_to_the_next(env):
    q = env.make("queue")
    dead, live = env.call(A, q, "get"), env.call(B, q, "get")
    env.dead.add(A.proc)
    env.call(C, q, "put", b"x")
    assert env.of(dead) is None and env.of(live) == (OK, b"x")
    assert env.table.stats()["parked"] == 0
    env.call(C, q, "put", b"y")                                # no getter: it stays
    assert env.now_(C, q, "qsize") == (OK, 1)


def test_a_dead_parked_acquirer_does_not_get_the_lock(env):
    lock = env.make("lock")
    env.now_(C, lock, "acquire")
    dead, live = env.call(A, lock, "acquire"), env.call(B, lock, "acquire")
    env.dead.add(A.proc)
    env.call(C, lock, "release")
    assert env.of(dead) is None and env.of(live) == (OK, True)


def test_caller_gone_drops_its_waiters_unanswered(env):
    q = env.make("queue")
    gone, other = env.call(A, q, "get"), env.call(B, q, "get")
    assert env.feed(env.table.caller_gone("a")) == []
    env.call(C, q, "put", b"x")
    assert env.of(gone) is None and env.of(other) == (OK, b"x")


def test_caller_gone_from_a_barrier_breaks_it_for_the_others(env):
    bar = env.make("barrier", parties=4)
    gone = [env.call(A, bar, "wait"), env.call(A2, bar, "wait")]
    other = env.call(B, bar, "wait")
    env.feed(env.table.caller_gone("a"))
    assert [env.of(t) for t in gone] == [None, None] and env.of(other) == (BROKEN, None)


# -- lifetime -----------------------------------------------------------------------------
def test_the_last_release_removes_the_object_and_answers_its_waiters_gone(env):
    q = env.make("queue")
    env.table.hold(q)
    get = env.call(A, q, "get")
    assert env.table.release(q) == [] and env.table.stats()["objects"] == 1
    env.feed(env.table.release(q))
    assert env.of(get)[0] == GONE
    assert env.now_(A, q, "qsize")[0] == GONE
    assert env.table.stats() == {"objects": 0, "by_kind": {}, "parked": 0}


def test_a_pickled_handle_keeps_the_object_until_it_is_unpickled(env):
    q = env.make("queue")
    env.table.pin(q)
    env.table.release(q)                                       # the sender's handle went
    assert env.now_(A, q, "qsize") == (OK, 0)
    env.table.adopt(q)
    env.table.adopt(q)                                         # pins never go below 0
    env.table.release(q)
    assert env.now_(A, q, "qsize") == (OK, 0)
    env.table.release(q)
    assert env.now_(A, q, "qsize")[0] == GONE


def test_an_adopt_without_a_pin_does_not_cancel_a_later_pin(env):
    q = env.make("queue")
    env.table.adopt(q)                                         # 2 handles, pins stay 0
    env.table.pin(q)
    env.table.release(q)
    env.table.release(q)
    assert env.now_(A, q, "qsize") == (OK, 0)                  # the pinned one is in flight


def test_a_condition_keeps_its_lock(env):
    lock = env.make("lock")
    cond = env.make("condition", lock=lock)
    env.table.release(lock)
    assert env.now_(A, lock, "acquire") == (OK, True)
    env.table.release(cond)
    assert env.now_(A, lock, "owner")[0] == GONE


def test_lifetime_calls_ignore_unknown_objects(env):
    for oid in (99, [1]):
        env.table.hold(oid)
        env.table.pin(oid)
        env.table.adopt(oid)
        assert env.table.release(oid) == []
    assert env.table.stats()["objects"] == 0


# -- bad requests ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, params, method, args, timeout, says", [
    ("queue", {}, "put", (5,), None, "item must be bytes"),
    ("queue", {}, "put", (), None, "the argument 'item' is missing"),
    ("queue", {}, "get", (), "soon", "timeout must be a number"),
    ("queue", {}, "get", None, None, "must be a tuple"),
    ("queue", {}, "fly", (), None, "no method 'fly'"),
    ("buffer", {"size": 2}, "read", ("0", 1), None, "start must be an int"),
    ("lock", {}, "acquire", (True, 1), None, "takes at most 0 arguments"),
    ("condition", None, "notify", ("n",), None, "n must be an int"),
])
def test_bad_arguments_are_answered_error(env, kind, params, method, args, timeout, says):
    oid = env.make(kind, **(params if params is not None else {"lock": env.make("lock")}))
    token = next(env.tokens)
    (done,) = env.table.request(token, A, oid, method, args, timeout)
    assert done.token == token and done.status == ERROR and says in done.value


@pytest.mark.parametrize("kind, params, says", [
    ("teapot", {}, "unknown kind"),
    ("queue", {"maxsize": "big"}, "maxsize must be an int"),
    ("queue", {"size": 3}, "unknown parameters \\['size'\\]"),
    ("semaphore", {"value": -1}, "value must be >= 0"),
    ("barrier", {"parties": 0}, "parties must be >= 1"),
    ("barrier", {}, "the argument 'parties' is missing"),
    ("buffer", {"size": 2, "initial": b"abc"}, "initial"),
    ("condition", {"lock": 42}, "not a lock"),
])
def test_bad_parameters_are_a_value_error(env, kind, params, says):
    with pytest.raises(ValueError, match=says):
        env.table.create(kind, params)


def test_an_unknown_object_is_gone(env):
    (done,) = env.table.request("t", A, 7, "get", (), None)
    assert done.token == "t" and done.status == GONE


def test_stats_count_objects_by_kind_and_parked_calls(env):
    q = env.make("queue")
    env.make("queue")
    env.make("event")
    env.call(A, q, "get")
    assert env.table.stats() == {"objects": 3, "by_kind": {"queue": 2, "event": 1},
                                 "parked": 1}
