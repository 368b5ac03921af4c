"""A small, bounded version of ``scripts/load_test.py``: concurrent /predict clients and a
streaming /analyse_video session against the app on loopback; and the queue's bookkeeping
stays bounded however many calls it serves."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import gradio as gr
import pytest
from app_helpers import free_port, launch
from gradio_client import Client, handle_file
from hostile_inputs import VALID_CLIP, VALID_IMAGE

import kdcore.app.patches.queue_hygiene
import scripts.loadtest
from kdcore.app.layout import MAX_QUEUED_REQUESTS, AppSettings
from kdcore.app.patches.queue_hygiene import UNDELIVERED_GRACE_S, QueueJanitor
from scripts.loadtest import APP_START_TIMEOUT_S, MAX_RSS_GROWTH_MB, AppProcess, run_load_test


def test_sustained_load_has_no_errors_leaks_or_left_over_hooks(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(scripts.loadtest, "RSS_SAMPLE_SECONDS", 1.0)
    settings = AppSettings(checkpoints=tiny_checkpoints["student"].parent, port=free_port())
    with AppProcess(settings) as app:
        report = run_load_test(app, VALID_IMAGE, VALID_CLIP, clients=2, calls=4)
        assert app.queue == {"max_size": MAX_QUEUED_REQUESTS, "default_concurrency_limit": 1}
    details = report.as_dict()
    assert report.predict_calls == 8 and report.predict_errors == 0, details
    assert report.stream["sessions"] >= 1 and report.stream["updates"] >= 20 and report.stream["errors"] == 0, details
    assert 0 < report.latency_ms["p50"] <= report.latency_ms["p95"]
    assert report.rss_mb["growth"] < MAX_RSS_GROWTH_MB, details
    seconds = [t for t, _ in report.rss_samples]
    assert seconds and seconds == sorted(seconds) and all(mb > 0 for _, mb in report.rss_samples)
    assert report.grad_cam_hooks["before"] == report.grad_cam_hooks["after"], details
    assert report.passed


@pytest.fixture()
def app_and_client(tiny_checkpoints) -> Iterator[tuple[gr.Blocks, Client]]:
    """A fresh app (no sessions yet) and one gradio_client session on it."""
    demo = launch(tiny_checkpoints["student"].parent)
    try:
        client = Client(demo.local_url, verbose=False, download_files=False)
        yield demo, client
        client.close()
    finally:
        demo.close()


def test_finished_events_and_old_analytics_are_forgotten(app_and_client, monkeypatch):
    """Gradio 5 would keep all 12 events, their tasks and "to reset" marks forever."""
    monkeypatch.setattr(kdcore.app.patches.queue_hygiene, "MAX_ANALYTICS_RECORDS", 5)
    demo, client = app_and_client
    for _ in range(12):
        payload, *_ = client.predict(handle_file(VALID_IMAGE), api_name="/predict")
        assert set(payload) == {"teacher", "student"}
    queue = demo._queue
    assert len(queue.event_ids_to_events) <= 2  # at most the last call's events, until delivered
    assert len(queue.event_analytics) <= 5 + 2
    assert {record["status"] for record in queue.event_analytics.values()} <= {"success", "processing"}
    assert len(queue._asyncio_tasks) <= 2  # Gradio 5 alone: 12
    assert len(demo.server_app.iterators_to_reset) <= 2  # Gradio 5 alone: 12


def test_streamed_clips_do_not_grow_the_session_state(app_and_client):
    """For an output updated with gr.skip()/gr.update(), Gradio 5.50 adds a rebuilt copy of
    the component to the session and never frees it: the video view must send plain values."""
    demo, client = app_and_client
    for _ in range(3):
        *_, summary = client.predict(handle_file(VALID_CLIP), 0.4, api_name="/analyse_video")
        assert "Clip summary" in summary
    (session,) = demo.server_app.state_holder.session_data.values()
    assert len(session.blocks_config.blocks) == len(demo.blocks)  # with gr.skip(): 75 vs 67 after 3 clips


def fake_task(done: bool) -> SimpleNamespace:
    return SimpleNamespace(done=lambda: done)


def fake_queue(analytics: int = 0) -> SimpleNamespace:
    """The parts of a Gradio 5.50 queue the janitor reads: one event queued, one running,
    one finished but undelivered, one finished and delivered; ``analytics`` old records;
    the task of the running event and of a finished one; finished runs marked "to reset"."""
    event = {name: SimpleNamespace(_id=name) for name in ("queued", "running", "undelivered", "done")}
    finished_task, running_task = fake_task(done=True), fake_task(done=False)
    return SimpleNamespace(
        server_app=SimpleNamespace(iterators_to_reset={"undelivered", "done", "old"}),
        _asyncio_tasks=[finished_task, running_task],
        running_task=running_task,
        pending_event_ids_session={"session": {"undelivered"}},
        event_queue_per_concurrency_id={"fn": SimpleNamespace(queue=[event["queued"]])},
        active_jobs=[None, [event["running"]]],
        event_ids_to_events=dict(event),
        event_analytics={**{f"old{i}": {"status": "success"} for i in range(analytics)}, "running": {}},
        event_count_at_last_cache=analytics,
    )


def test_events_a_client_may_still_ask_about_are_kept():
    janitor = QueueJanitor(fake_queue())
    janitor.finished_at["undelivered"] = 100.0
    janitor.forget_finished_events(now=100.0 + UNDELIVERED_GRACE_S - 1)
    assert set(janitor.queue.event_ids_to_events) == {"queued", "running", "undelivered"}


def test_results_nobody_collected_are_dropped_after_the_grace_period():
    """A client that left before its result arrived: Gradio would keep the event forever."""
    janitor = QueueJanitor(fake_queue())
    janitor.forget_finished_events(now=100.0)  # first seen finished now
    janitor.forget_finished_events(now=100.0 + UNDELIVERED_GRACE_S)
    assert set(janitor.queue.event_ids_to_events) == {"queued", "running"}
    assert janitor.queue.pending_event_ids_session == {"session": set()}  # the heartbeat won't look it up
    assert janitor.finished_at == {}


def test_analytics_keep_the_newest_records_and_those_of_running_events(monkeypatch):
    monkeypatch.setattr(kdcore.app.patches.queue_hygiene, "MAX_ANALYTICS_RECORDS", 3)
    janitor = QueueJanitor(fake_queue(analytics=5))
    janitor.forget_finished_events()
    assert list(janitor.queue.event_analytics) == ["old3", "old4", "running"]
    assert janitor.queue.event_count_at_last_cache == 3  # the summary keeps refreshing


def test_tasks_of_finished_runs_are_dropped():
    janitor = QueueJanitor(fake_queue())
    janitor.forget_finished_events()
    assert janitor.queue._asyncio_tasks == [janitor.queue.running_task]


def test_finished_runs_are_no_longer_marked_to_reset():
    janitor = QueueJanitor(fake_queue())
    janitor.forget_finished_iterators(["undelivered", "done"])
    assert janitor.queue.server_app.iterators_to_reset == {"old"}


def test_an_app_process_that_dies_at_start_up_is_reported_at_once(tiny_checkpoints):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = AppSettings(checkpoints=tiny_checkpoints["student"].parent, port=taken.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"ended during start-up \(exit code 1\)"):
            with AppProcess(settings):
                pass
    assert time.monotonic() - started < APP_START_TIMEOUT_S / 2
