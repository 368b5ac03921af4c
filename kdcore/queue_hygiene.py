"""Keep Gradio 5's queue bookkeeping bounded while the app serves for hours.

Gradio 5.50 keeps every finished event in ``Queue.event_ids_to_events`` (with its request and
input payload) and one analytics record per event, for as long as the server runs: memory
grows with every call. Gradio 6 fixed this (gradio-app/gradio#13154, PRs #13156 and
#13756), but FastRTC, which the live view needs, requires Gradio 5. We wrap the queue's
``process_events`` so that after each run the events nobody can still ask about are forgotten.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

MAX_ANALYTICS_RECORDS = 1000
FINISHED_STATUSES = frozenset({"success", "failed", "cancelled"})


def live_event_ids(queue: Any) -> set[str]:
    """Events still queued, running, or whose result a client has not yet received."""
    pending = {event_id for ids in queue.pending_event_ids_session.values() for event_id in ids}
    queued = {event._id for waiting in queue.event_queue_per_concurrency_id.values() for event in waiting.queue}
    running = {event._id for job in queue.active_jobs if job for event in job}
    return pending | queued | running


def forget_finished_events(queue: Any) -> None:
    """Drop finished events, and analytics records beyond the newest ``MAX_ANALYTICS_RECORDS``."""
    live = live_event_ids(queue)
    for event_id in [event_id for event_id in queue.event_ids_to_events if event_id not in live]:
        del queue.event_ids_to_events[event_id]
    excess = len(queue.event_analytics) - MAX_ANALYTICS_RECORDS
    if excess <= 0:
        return
    finished = [key for key, record in queue.event_analytics.items() if record.get("status") in FINISHED_STATUSES]
    for event_id in finished[:excess]:  # insertion order: oldest first
        del queue.event_analytics[event_id]
    # The analytics summary refreshes every N new records; keep its counter in step.
    queue.event_count_at_last_cache = max(0, queue.event_count_at_last_cache - min(excess, len(finished)))


def bound_queue_bookkeeping(demo: gr.Blocks) -> gr.Blocks:
    """After each run of ``demo``'s queue, forget what is finished (call after ``demo.queue()``)."""
    queue = demo._queue
    run_events = queue.process_events

    async def process_events_then_forget(events: list, batch: bool, begin_time: float) -> None:
        try:
            await run_events(events, batch, begin_time)
        finally:
            forget_finished_events(queue)

    queue.process_events = process_events_then_forget
    return demo
