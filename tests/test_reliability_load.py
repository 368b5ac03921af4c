"""A small, bounded version of ``scripts/load_test.py``: concurrent /predict clients and a
streaming /analyse_video session against the app on loopback; and the queue's bookkeeping
stays bounded however many calls it serves."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from app_helpers import free_port, launch
from gradio_client import Client, handle_file
from hostile_inputs import VALID_CLIP, VALID_IMAGE
from PIL import Image

import kdcore.app.patches.queue_hygiene
import scripts.loadtest
from kdcore.app.layout import MAX_QUEUED_REQUESTS, AppSettings
from kdcore.app.patches.queue_hygiene import UNDELIVERED_GRACE_S, QueueJanitor
from kdcore.app.service import DISPLAY_MAX_SIDE, ImageAnalysis
from scripts.loadtest import (
    APP_START_TIMEOUT_S,
    MAX_RSS_GROWTH_MB,
    AppProcess,
    run_fresh_sessions_test,
    run_load_test,
)


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


def test_fresh_sessions_mode_reports_memory_per_round(tiny_checkpoints):
    settings = AppSettings(checkpoints=tiny_checkpoints["student"].parent, port=free_port(), max_sessions=3)
    with AppProcess(settings) as app:
        report = run_fresh_sessions_test(app, VALID_IMAGE, VALID_CLIP, clients=2, calls=2, rounds=2, warmup_calls=1)
    details = report.as_dict()
    assert [r["round"] for r in report.rounds] == [1, 2], details
    assert all(
        r["predict_calls"] == 4 and r["predict_errors"] == 0 and r["stream_sessions"] >= 1 for r in report.rounds
    )
    assert all(r["sessions_held"] <= 3 for r in report.rounds), details  # new sessions each round, capped
    assert report.rss_mb_after_warmup > 0 and report.passed, details


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
    janitor = QueueJanitor(fake_queue(), SimpleNamespace())
    janitor.finished_at["undelivered"] = 100.0
    janitor.forget_finished_events(now=100.0 + UNDELIVERED_GRACE_S - 1)
    assert set(janitor.queue.event_ids_to_events) == {"queued", "running", "undelivered"}


def test_results_nobody_collected_are_dropped_after_the_grace_period():
    """A client that left before its result arrived: Gradio would keep the event forever."""
    janitor = QueueJanitor(fake_queue(), SimpleNamespace())
    janitor.forget_finished_events(now=100.0)  # first seen finished now
    janitor.forget_finished_events(now=100.0 + UNDELIVERED_GRACE_S)
    assert set(janitor.queue.event_ids_to_events) == {"queued", "running"}
    assert janitor.queue.pending_event_ids_session == {"session": set()}  # the heartbeat won't look it up
    assert janitor.finished_at == {}


def test_analytics_keep_the_newest_records_and_those_of_running_events(monkeypatch):
    monkeypatch.setattr(kdcore.app.patches.queue_hygiene, "MAX_ANALYTICS_RECORDS", 3)
    janitor = QueueJanitor(fake_queue(analytics=5), SimpleNamespace())
    janitor.forget_finished_events()
    assert list(janitor.queue.event_analytics) == ["old3", "old4", "running"]
    assert janitor.queue.event_count_at_last_cache == 3  # the summary keeps refreshing


def test_tasks_of_finished_runs_are_dropped():
    janitor = QueueJanitor(fake_queue(), SimpleNamespace())
    janitor.forget_finished_events()
    assert janitor.queue._asyncio_tasks == [janitor.queue.running_task]


def test_finished_runs_are_no_longer_marked_to_reset():
    janitor = QueueJanitor(fake_queue(), SimpleNamespace())
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


def _fresh_sessions_round(demo: gr.Blocks, image, clients: int, calls: int) -> None:
    """``clients`` new gradio_client sessions (as new browser tabs are), ``calls`` /predict each."""
    for _ in range(clients):
        client = Client(demo.local_url, verbose=False, download_files=False)
        for _ in range(calls):
            payload, *_ = client.predict(handle_file(image), api_name="/predict")
            assert set(payload) == {"teacher", "student"}
        client.close()


def _server_bookkeeping(demo: gr.Blocks) -> dict[str, int]:
    gc.collect()
    holder = demo.state_holder
    return {
        "sessions": len(holder.session_data),
        "session_clocks": len(holder.time_last_used),
        "pending_id_sets": len(demo._queue.pending_event_ids_session),
        "objects": len(gc.get_objects()),
    }


def test_rounds_of_fresh_sessions_leave_bounded_state(tiny_checkpoints, tmp_path):
    """Every new tab or API client is a new session: their number, and what each keeps, is bounded.
    Gradio 5 alone keeps up to 10,000 sessions (each a copy of the app's config and its
    gr.State values) and one clock and id set per session it ever saw."""
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000), dtype=np.uint8)).save(big)
    demo = launch(tiny_checkpoints["student"].parent, max_sessions=4)
    try:
        _fresh_sessions_round(demo, big, clients=4, calls=1)  # warm-up
        rounds = []
        for _ in range(3):
            _fresh_sessions_round(demo, big, clients=4, calls=2)
            rounds.append(_server_bookkeeping(demo))
        after = rounds[-1]
        analyses = [
            value for session in demo.state_holder.session_data.values() for value in session.state_data.values()
        ]
    finally:
        demo.close()
    assert after["sessions"] <= 4 and after["session_clocks"] <= 4 and after["pending_id_sets"] <= 4, after
    # Flat from round to round (the clients run in this process too, hence some slack).
    assert after["objects"] - rounds[0]["objects"] < 1500, rounds
    kept = [a for a in analyses if isinstance(a, ImageAnalysis)]
    assert kept and all(max(a.grey.shape) <= DISPLAY_MAX_SIDE for a in kept)  # not the 2000 px upload
