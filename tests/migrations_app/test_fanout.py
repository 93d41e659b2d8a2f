"""The per-process fan-out: one watcher's fault stays with that watcher; the reader outlives faults.

Real Redis channel layer; the watchers are small objects standing in for sockets, because the fault
under test (a watcher raising while it takes an update) is what a broken socket would do.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from channels.layers import get_channel_layer

from migrations_app.fanout import get_fanout

pytestmark = [pytest.mark.usefixtures("redis_url")]


class Recorder:
    def __init__(self) -> None:
        self.received: asyncio.Queue[str] = asyncio.Queue()
        self.dropped = False

    def deliver(self, html: str) -> None:
        self.received.put_nowait(html)

    def view_key(self, message: dict) -> str:  # one class per text: the fan-out renders each once
        return message["html"]

    def render_view(self, message: dict, key: str) -> str:
        return key

    def drop(self) -> None:
        self.dropped = True


class Faulty(Recorder):
    def wants(self, message: dict) -> bool:
        raise ValueError("invalid literal for int() with base 10: '²'")


async def publish(group: str, html: str) -> None:
    await get_channel_layer().group_send(group, {"type": "progress", "group": group, "html": html})


async def test_a_watcher_that_raises_is_dropped_alone_and_the_others_keep_receiving(caplog):
    fanout = get_fanout()
    good, faulty = Recorder(), Faulty()
    await fanout.join("fanout-test-a", faulty)
    await fanout.join("fanout-test-a", good)
    with caplog.at_level(logging.ERROR, logger="migrations_app.fanout"):
        await publish("fanout-test-a", "first")
        assert await asyncio.wait_for(good.received.get(), 5) == "first"
    assert faulty.dropped and faulty not in fanout.members["fanout-test-a"]
    assert "failed to take an update" in caplog.text

    await publish("fanout-test-a", "second")
    assert await asyncio.wait_for(good.received.get(), 5) == "second"
    for task in fanout.tasks:
        task.cancel()


async def test_a_reader_that_stops_is_restarted_and_logged(caplog, monkeypatch):
    fanout = get_fanout()
    good = Recorder()
    await fanout.join("fanout-test-b", good)
    original = fanout._dispatch
    calls = []

    async def breaks_once(message: dict) -> None:
        calls.append(message)
        if len(calls) == 1:
            raise RuntimeError("a bug in the reader")
        await original(message)

    monkeypatch.setattr(fanout, "_dispatch", breaks_once)
    with caplog.at_level(logging.ERROR, logger="migrations_app.fanout"):
        await publish("fanout-test-b", "lost with the reader")
        for _ in range(100):
            if fanout.reader_restarts:
                break
            await asyncio.sleep(0.05)
        assert fanout.reader_restarts == 1
        assert "reader stopped; restarting it" in caplog.text
    await asyncio.sleep(0.3)
    await publish("fanout-test-b", "after the restart")
    assert await asyncio.wait_for(good.received.get(), 5) == "after the restart"
    for task in fanout.tasks:
        task.cancel()


class Classed(Recorder):
    """A watcher in class ``name``: what it is sent is rendered for its class, counted per render."""

    renders: list[str] = []

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def view_key(self, message: dict) -> tuple:
        return (message["html"], self.name)

    def render_view(self, message: dict, key: tuple) -> str:
        Classed.renders.append(self.name)
        return f"{message['html']} for {self.name}"


async def test_each_class_of_watchers_is_rendered_once_per_message_and_each_gets_its_own():
    fanout = get_fanout()
    watchers = [Classed("viewer") for _ in range(5)] + [Classed("operator") for _ in range(3)]
    for watcher in watchers:
        await fanout.join("fanout-test-c", watcher)
    Classed.renders.clear()
    await publish("fanout-test-c", "v7")
    got = [await asyncio.wait_for(watcher.received.get(), 5) for watcher in watchers]
    assert got == ["v7 for viewer"] * 5 + ["v7 for operator"] * 3
    assert sorted(Classed.renders) == ["operator", "viewer"]  # one render per class, not per socket
    await publish("fanout-test-c", "v7")  # the same version again: from the process's cache
    assert await asyncio.wait_for(watchers[0].received.get(), 5) == "v7 for viewer"
    assert sorted(Classed.renders) == ["operator", "viewer"]
    for task in fanout.tasks:
        task.cancel()


class Tokened(Classed):
    """A watcher whose class of view follows its token (``view_token``, e.g. its user's rights)."""

    keys_asked = 0

    @property
    def view_token(self) -> str:
        return self.name

    def view_key(self, message: dict) -> tuple:
        Tokened.keys_asked += 1
        return super().view_key(message)


async def test_watchers_with_one_token_are_asked_their_class_once_per_message_and_all_get_it():
    """A thousand sockets of one team cost one class computation per push, not a thousand (the push
    slowed by that much at 1,000 watchers: ``bench/bench_ws_fanout.py``); each still gets its class."""
    fanout = get_fanout()
    watchers = [Tokened("viewer") for _ in range(50)] + [Tokened("operator") for _ in range(20)]
    for watcher in watchers:
        await fanout.join("fanout-test-t", watcher)
    Tokened.keys_asked = 0
    await publish("fanout-test-t", "v8")
    got = [await asyncio.wait_for(watcher.received.get(), 5) for watcher in watchers]
    assert got == ["v8 for viewer"] * 50 + ["v8 for operator"] * 20
    assert Tokened.keys_asked == 2
    for task in fanout.tasks:
        task.cancel()
