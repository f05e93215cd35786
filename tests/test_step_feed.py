"""The step connections of the Ray executor (cluster/step_feed.py) without Ray: real sockets on
127.0.0.1, the serving loop in a thread or in a process of its own that gets killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.connection import AuthenticationError, Client

import pytest

from dflash_ray.cluster.step_feed import ActorGone, Feeds, StepRaised, serve

KEY = os.urandom(32)
HOST = "127.0.0.1"


def step(x: int, how: str = "ok"):
    if how == "raise":
        raise ValueError(f"bad step {x}")
    if how == "sleep":
        time.sleep(60)
    return {"doubled": 2 * x}


def _serve_in_child(address_out, key: bytes) -> None:
    address_out.send(serve(step, HOST, key))
    time.sleep(120)  # the loop runs on its daemon thread until the test kills this process


def test_results_and_a_raised_step_come_back_by_name():
    feeds = Feeds(KEY)
    feeds.connect("a", serve(step, HOST, KEY), 30)
    feeds.connect("b", serve(step, HOST, KEY), 30)
    try:
        sent, failed = feeds.submit(["a", "b"], 21)
        assert (sent, failed) == (["a", "b"], {})
        outs, failed, pending = feeds.collect(sent, time.monotonic() + 30, frozenset(sent))
        assert outs == {"a": {"doubled": 42}, "b": {"doubled": 42}}
        assert (failed, pending) == ({}, [])
        # a step that raises answers with its traceback; the loop keeps serving
        feeds.submit(["a"], 3, "raise")
        feeds.submit(["b"], 4)
        outs, failed, pending = feeds.collect(["a", "b"], time.monotonic() + 30, frozenset())
        assert outs == {"b": {"doubled": 8}} and pending == []
        assert isinstance(failed["a"], StepRaised)
        text = str(failed["a"])
        assert "ValueError: bad step 3" in text and "Traceback" in text
        feeds.submit(["a"], 5)
        assert feeds.collect(["a"], time.monotonic() + 30, frozenset())[0] == {"a": {"doubled": 10}}
    finally:
        feeds.close()


def test_a_hung_actor_is_pending_at_the_deadline():
    feeds = Feeds(KEY)
    feeds.connect("slow", serve(step, HOST, KEY), 30)
    feeds.connect("fast", serve(step, HOST, KEY), 30)
    try:
        feeds.submit(["slow"], 1, "sleep")
        feeds.submit(["fast"], 2)
        outs, failed, pending = feeds.collect(["slow", "fast"], time.monotonic() + 1.0,
                                              frozenset())
        assert outs == {"fast": {"doubled": 4}} and failed == {} and pending == ["slow"]
    finally:
        feeds.close()


def test_a_killed_actor_is_gone_before_the_deadline():
    """The dead process's socket closes, so the read ends with ActorGone, not with the
    deadline (pending would say the deadline ended it)."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_serve_in_child, args=(theirs, KEY), daemon=True)
    child.start()
    feeds = Feeds(KEY)
    try:
        assert ours.poll(60), "the serving child did not start"
        feeds.connect("shard", ours.recv(), 30)
        feeds.submit(["shard"], 1, "sleep")
        os.kill(child.pid, signal.SIGKILL)
        outs, failed, pending = feeds.collect(["shard"], time.monotonic() + 60,
                                              frozenset(["shard"]))
        assert outs == {} and pending == []
        assert isinstance(failed["shard"], ActorGone)
        sent, failed = feeds.submit(["shard"], 2)  # writing to it now fails too, or reads EOF
        if sent:
            failed = feeds.collect(sent, time.monotonic() + 60, frozenset())[1]
        assert isinstance(failed["shard"], ActorGone)
    finally:
        feeds.close()
        child.kill()
        child.join()


def test_strangers_are_refused_and_the_loop_still_serves_its_executor():
    address = serve(step, HOST, KEY)
    socket.create_connection(address).close()  # a stranger that hangs up (a port scan)
    with pytest.raises(AuthenticationError):
        Client(address, family="AF_INET", authkey=b"not the key")
    feeds = Feeds(KEY)
    try:
        feeds.connect("a", address, 30)
        feeds.submit(["a"], 7)
        assert feeds.collect(["a"], time.monotonic() + 30, frozenset())[0] == {"a": {"doubled": 14}}
    finally:
        feeds.close()
