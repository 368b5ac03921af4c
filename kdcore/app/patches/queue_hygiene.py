"""Keep Gradio 5's queue bookkeeping bounded while the app serves for hours.

Gradio 5.50 keeps, for as long as the server runs, every finished event in
``Queue.event_ids_to_events`` (with its request and input payload), one analytics record per
event, every finished run's asyncio task (``Queue._asyncio_tasks``) and event id
(``App.iterators_to_reset``): memory grows with every call. Gradio 6 fixed the events
(gradio-app/gradio#13154, PRs #13156 and #13756), but FastRTC, which the live view needs,
requires Gradio 5. We wrap the queue's ``process_events`` so that after each run what is
finished is forgotten: an event at once when its result was delivered, after
``UNDELIVERED_GRACE_S`` when the client left before it was (Gradio never clears those from
``pending_event_ids_session``).

Per session, Gradio 5.50 also keeps a clock (``StateHolder.time_last_used``), a set of pending
event ids and, for streamed inputs, a dict of streams long after the session itself was
evicted (``state_session_capacity``): those go when their session has gone.

Everything here runs on the server's event loop, between awaits, like the Gradio code that
reads these dicts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import gradio as gr

MAX_ANALYTICS_RECORDS = 1000
UNDELIVERED_GRACE_S = 600.0


class QueueJanitor:
    """Forgets a Gradio queue's finished events; ``finished_at`` remembers when each run ended."""

    def __init__(self, queue: Any, blocks: gr.Blocks) -> None:
        self.queue = queue
        self.blocks = blocks
        self.finished_at: dict[str, float] = {}

    def active_event_ids(self) -> set[str]:
        """Events waiting in a queue or running now."""
        waiting = self.queue.event_queue_per_concurrency_id.values()
        queued = {event._id for event_queue in waiting for event in event_queue.queue}
        running = {event._id for job in self.queue.active_jobs if job for event in job}
        return queued | running

    def forget_finished_events(self, now: float | None = None) -> None:
        """Drop finished events (an undelivered one after the grace period), old analytics records
        and the tasks of finished runs."""
        now = time.monotonic() if now is None else now
        queue, active = self.queue, self.active_event_ids()
        pending_by_session = queue.pending_event_ids_session
        pending = {event_id for ids in pending_by_session.values() for event_id in ids}
        for event_id in [event_id for event_id in queue.event_ids_to_events if event_id not in active]:
            if event_id in pending:
                if now - self.finished_at.setdefault(event_id, now) < UNDELIVERED_GRACE_S:
                    continue  # its client may still be reading the result
                for ids in pending_by_session.values():  # the heartbeat looks pending ids up: drop both
                    ids.discard(event_id)
            del queue.event_ids_to_events[event_id]
            self.finished_at.pop(event_id, None)
        self._trim_analytics(active)
        queue._asyncio_tasks = [task for task in queue._asyncio_tasks if not task.done()]

    def forget_finished_iterators(self, event_ids: Iterable[str]) -> None:
        """Gradio marks each finished run's event id "to reset" and never unmarks it unless the
        same event runs again, which a finished event never does."""
        self.queue.server_app.iterators_to_reset.difference_update(event_ids)

    def forget_departed_sessions(self) -> None:
        """Drop the per-session records of sessions the state holder no longer has."""
        holder = self.blocks.state_holder
        live = set(holder.session_data)
        for session in [s for s in holder.time_last_used if s not in live]:
            holder.time_last_used.pop(session, None)
        pending = self.queue.pending_event_ids_session
        for session in [s for s, ids in pending.items() if s not in live and not ids]:
            del pending[session]
        streams = self.blocks.pending_streams
        for session in [s for s in streams if s not in live]:
            del streams[session]

    def _trim_analytics(self, active: set[str]) -> None:
        queue = self.queue
        excess = len(queue.event_analytics) - MAX_ANALYTICS_RECORDS
        if excess <= 0:
            return
        done = [event_id for event_id in queue.event_analytics if event_id not in active]
        for event_id in done[:excess]:  # insertion order: oldest first
            del queue.event_analytics[event_id]
        # The analytics summary refreshes every N new records; never let its counter exceed the count.
        queue.event_count_at_last_cache = min(queue.event_count_at_last_cache, len(queue.event_analytics))


def bound_queue_bookkeeping(demo: gr.Blocks) -> gr.Blocks:
    """After each run of ``demo``'s queue, forget what is finished (call after ``demo.queue()``)."""
    janitor = QueueJanitor(demo._queue, demo)
    run_events = demo._queue.process_events

    async def process_events_then_forget(events: list, batch: bool, begin_time: float) -> None:
        try:
            await run_events(events, batch, begin_time)
        finally:
            janitor.finished_at.update((event._id, time.monotonic()) for event in events)
            janitor.forget_finished_events()
            janitor.forget_finished_iterators(event._id for event in events)
            janitor.forget_departed_sessions()

    demo._queue.process_events = process_events_then_forget
    return demo
