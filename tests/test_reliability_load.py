"""A small, bounded version of ``scripts/load_test.py``: concurrent /predict clients and a
streaming /analyse_video session against the app on loopback; and the queue's bookkeeping
stays bounded however many calls it serves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from app_helpers import free_port, launch
from gradio_client import Client, handle_file
from hostile_inputs import VALID_CLIP, VALID_IMAGE

import kdcore.loadtest
import kdcore.queue_hygiene
from kdcore.loadtest import MAX_RSS_GROWTH_MB, AppProcess, run_load_test
from kdcore.ui import MAX_QUEUED_REQUESTS, AppSettings


def test_sustained_load_has_no_errors_leaks_or_left_over_hooks(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(kdcore.loadtest, "RSS_SAMPLE_SECONDS", 1.0)
    settings = AppSettings(checkpoints=tiny_checkpoints["student"].parent, port=free_port())
    with AppProcess(settings) as app:
        report = run_load_test(app, VALID_IMAGE, VALID_CLIP, clients=2, calls=4)
        assert app.queue == {"max_size": MAX_QUEUED_REQUESTS, "default_concurrency_limit": 1}
    details = report.as_dict()
    assert report.predict_calls == 8 and report.predict_errors == 0, details
    assert report.stream["sessions"] >= 1 and report.stream["updates"] >= 20 and report.stream["errors"] == 0, details
    assert 0 < report.latency_ms["p50"] <= report.latency_ms["p95"]
    assert report.rss_mb["growth"] < MAX_RSS_GROWTH_MB, details
    assert report.rss_samples and all(
        report.rss_mb["before"] / 2 < mb < 2 * report.rss_mb["after"] for _, mb in report.rss_samples
    )
    assert report.grad_cam_hooks["before"] == report.grad_cam_hooks["after"], details
    assert report.passed


def test_finished_events_and_old_analytics_are_forgotten(tiny_checkpoints, monkeypatch):
    """Gradio 5 would keep all 2 x 12 events (each /predict chains a summary event) forever."""
    monkeypatch.setattr(kdcore.queue_hygiene, "MAX_ANALYTICS_RECORDS", 5)
    demo = launch(tiny_checkpoints["student"].parent)
    client = Client(demo.local_url, verbose=False, download_files=False)
    try:
        for _ in range(12):
            payload, *_ = client.predict(handle_file(VALID_IMAGE), api_name="/predict")
            assert set(payload) == {"teacher", "student"}
        queue = demo._queue
        assert len(queue.event_ids_to_events) <= 2  # at most the last call's events, until delivered
        assert len(queue.event_analytics) <= 5 + 2
        assert {record["status"] for record in queue.event_analytics.values()} <= {"success", "processing"}
    finally:
        client.close()
        demo.close()


@pytest.mark.parametrize("undelivered", [True, False])
def test_events_a_client_may_still_ask_about_are_kept(undelivered):
    """Queued, running and undelivered events stay; only the rest is forgotten."""
    event = {name: SimpleNamespace(_id=name) for name in ("queued", "running", "undelivered", "done")}
    queue = SimpleNamespace(
        pending_event_ids_session={"session": {"undelivered"} if undelivered else set()},
        event_queue_per_concurrency_id={"fn": SimpleNamespace(queue=[event["queued"]])},
        active_jobs=[None, [event["running"]]],
        event_ids_to_events=dict(event),
        event_analytics={},
        event_count_at_last_cache=0,
    )
    kdcore.queue_hygiene.forget_finished_events(queue)
    kept = {"queued", "running", "undelivered"} if undelivered else {"queued", "running"}
    assert set(queue.event_ids_to_events) == kept
