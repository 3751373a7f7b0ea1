"""Fan-out of fabric events to websocket clients.

Handlers run in worker threads; websocket clients live on the event loop. A publisher
calls :meth:`EventHub.publish` from any thread; each subscriber gets the event through
``loop.call_soon_threadsafe`` into its own bounded queue (a slow client loses its oldest
events, it never blocks a handler).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

__all__ = ["ALL_TREES", "EventHub", "Subscription"]

#: Subscribing to this tree id means every tree.
ALL_TREES = "*"


class Subscription:
    """One websocket client's queue and the trees it listens to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int):
        self.loop = loop
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=maxsize)
        self.tree_ids: set[str] = set()
        self.dropped = 0

    def wants(self, tree_id: str) -> bool:
        return ALL_TREES in self.tree_ids or tree_id in self.tree_ids

    def offer(self, event: dict[str, Any]) -> None:
        """Queue ``event`` (call on the loop's thread); drop the oldest when full."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)


class EventHub:
    """Thread-safe registry of subscriptions and the publishing side."""

    def __init__(self, queue_size: int = 256):
        self._queue_size = queue_size
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscription:
        sub = Subscription(loop, self._queue_size)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def set_interest(self, sub: Subscription, tree_id: str, interested: bool) -> None:
        with self._lock:
            if interested:
                sub.tree_ids.add(tree_id)
            else:
                sub.tree_ids.discard(tree_id)

    def wants(self, tree_id: str) -> bool:
        """Whether any client listens to ``tree_id`` (so frames are worth encoding)."""
        with self._lock:
            return any(s.wants(tree_id) for s in self._subs)

    def publish(self, event: dict[str, Any]) -> None:
        """Deliver ``event`` (which names its ``tree_id``) to every interested client."""
        tree_id = event["tree_id"]
        with self._lock:
            targets = [s for s in self._subs if s.wants(tree_id)]
        for sub in targets:
            try:
                sub.loop.call_soon_threadsafe(sub.offer, event)
            except RuntimeError:  # the client's loop is closed: it is going away
                self.unsubscribe(sub)
