"""A small, bounded version of ``scripts/load_test.py``: concurrent /predict clients and a
streaming /analyse_video session against the app on loopback."""

from __future__ import annotations

from app_helpers import launch
from hostile_inputs import VALID_CLIP, VALID_IMAGE

from kdcore.loadtest import MAX_RSS_GROWTH_MB, queue_settings, run_load_test
from kdcore.ui import MAX_QUEUED_REQUESTS


def test_sustained_load_has_no_errors_leaks_or_left_over_hooks(tiny_checkpoints):
    demo = launch(tiny_checkpoints["student"].parent)
    try:
        report = run_load_test(demo.local_url, VALID_IMAGE, VALID_CLIP, clients=2, calls=4)
        assert queue_settings(demo) == {"max_size": MAX_QUEUED_REQUESTS, "default_concurrency_limit": 1}
    finally:
        demo.close()
    details = report.as_dict()
    assert report.predict_calls == 8 and report.predict_errors == 0, details
    assert report.stream["sessions"] >= 1 and report.stream["updates"] >= 20 and report.stream["errors"] == 0, details
    assert 0 < report.latency_ms["p50"] <= report.latency_ms["p95"]
    assert report.rss_mb["growth"] < MAX_RSS_GROWTH_MB, details
    assert report.grad_cam_hooks["before"] == report.grad_cam_hooks["after"], details
    assert report.passed
