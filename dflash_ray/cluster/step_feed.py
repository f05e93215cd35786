"""The per-step calls to the actors over one direct connection each, instead of an actor call.

An actor call per step passes several threads on each side (task submission, the argument
pickled into the object store, a `ray.wait` / `ray.get` round trip): 2.3-2.5 ms for a step-sized
call on this project's 2-core box, against 0.4-0.7 ms for a message each way over a pipe or
gloo (`bench/call_latency.py`, docs/benchmarks.md); over these connections the executor's
overhead came to ~0.75 ms a step in all (`bench/ray_executor.py`). Here each actor serves a
loop on a thread of its own: it waits for the step's arguments on a
`multiprocessing.connection` (TCP, length-framed pickles, an HMAC handshake on a key the
executor draws), runs the same `step` method an actor call would, and sends back its result or
its traceback. The executor writes one message to
every actor of a step and reads their answers with one deadline.

What actor calls gave for free is kept: a dead actor closes its socket, so the executor's read
ends at once with `ActorGone` (the step is not left waiting for the deadline); a hung one is the
deadline's; a step that raised in the actor comes back as `StepRaised` with its traceback. The
actors keep answering ordinary actor calls meanwhile (Ray runs those on its own thread), which
the executor uses for the drafter's liveness probe and to connect a restarted drafter.

Unlike compiled graphs' loops, this one blocks in `recv` while it waits (no core spun).
Nothing here imports ray: the executor passes addresses.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener, wait

log = logging.getLogger(__name__)


class ActorGone(ConnectionError):
    """The actor's end of its connection closed: its process died or was killed."""


class StepRaised(RuntimeError):
    """The actor's step raised; the message carries the actor's traceback."""


def serve(step: Callable, host: str, authkey: bytes,
          on_start: Callable[[], None] | None = None) -> tuple[str, int]:
    """Actor side: listen on a free port of `host` and run `step(*args)` for every message of
    the one connection accepted (on a daemon thread, `on_start` first); returns the address."""
    listener = Listener((host, 0), family="AF_INET", authkey=authkey)
    thread = threading.Thread(target=_loop, args=(listener, step, on_start), daemon=True,
                              name="dflash-step-feed")
    thread.start()
    return listener.address


def _accept(listener: Listener) -> Connection:
    with listener:
        while True:
            try:
                return listener.accept()
            except (AuthenticationError, EOFError, OSError) as exc:  # not our executor (a
                # stranger, a port scan): keep listening for it
                log.warning("step feed refused a connection (%s)", exc)


def _loop(listener: Listener, step: Callable, on_start: Callable[[], None] | None) -> None:
    conn = _accept(listener)
    if on_start is not None:
        on_start()
    with conn:
        while True:
            try:
                args = conn.recv()
            except (EOFError, OSError):  # the executor closed the feed or went away
                return
            try:
                reply = (True, step(*args))
            except BaseException:
                reply = (False, traceback.format_exc())
            try:
                conn.send(reply)
            except OSError:
                return


class Feeds:
    """Executor side: a connection per actor name; `submit` a step to some, `collect` them."""

    def __init__(self, authkey: bytes):
        self.authkey = authkey
        self._conns: dict[str, Connection] = {}

    def connect(self, name: str, address: tuple[str, int], timeout_s: float) -> None:
        """Connect to `name`'s loop; raises TimeoutError past `timeout_s` (`Client` itself has
        no timeout: it runs on a daemon thread, left behind if it hangs)."""
        self.drop(name)
        done: list = []

        def dial() -> None:
            try:
                done.append(Client(address, family="AF_INET", authkey=self.authkey))
            except BaseException as exc:
                done.append(exc)

        thread = threading.Thread(target=dial, daemon=True, name=f"dflash-feed-dial-{name}")
        thread.start()
        thread.join(timeout_s)
        if not done:
            raise TimeoutError(f"{name}'s step connection at {address} did not answer within "
                               f"{timeout_s:g} s")
        if isinstance(done[0], BaseException):
            raise done[0]
        self._conns[name] = done[0]

    def drop(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for name in list(self._conns):
            self.drop(name)

    def submit(self, names: Iterable[str], *args) -> tuple[list[str], dict[str, Exception]]:
        """Send the step's arguments to each of `names`: (those sent, failures by name)."""
        sent, failed = [], {}
        for name in names:
            try:
                self._conns[name].send(args)
                sent.append(name)
            except OSError as exc:
                failed[name] = ActorGone(f"its step connection is closed ({exc})")
        return sent, failed

    def collect(self, names: Iterable[str], deadline: float, critical: frozenset[str],
                grace_s: float = 1.0) -> tuple[dict, dict[str, Exception], list[str]]:
        """Each actor's answer by name until `deadline` (time.monotonic()): (results, failures,
        still pending). Once one of `critical` has failed the rest get at most `grace_s` more:
        the peers of a dead shard fail within moments (their collectives lose it)."""
        pending = {self._conns[n]: n for n in names}
        outs, failed = {}, {}
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                name = pending.pop(conn)
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError) as exc:
                    failed[name] = ActorGone(f"its step connection closed ({exc or 'EOF'})")
                    continue
                except Exception as exc:  # an answer that does not unpickle: the step failed
                    failed[name] = StepRaised(f"its answer could not be read: {exc!r}")
                    continue
                if ok:
                    outs[name] = value
                else:
                    failed[name] = StepRaised(value)
            if critical & failed.keys():
                deadline = min(deadline, time.monotonic() + grace_s)
        return outs, failed, sorted(pending.values())
