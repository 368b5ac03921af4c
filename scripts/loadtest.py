"""Sustained load on a running app over loopback: concurrent gradio_client clients calling
``/predict`` while one client streams ``/analyse_video`` sessions. Reports latency
percentiles, errors, the app's resident-memory growth and its Grad-CAM hook count before
and after. Two shapes: the same client sessions throughout (``run_load_test``), or every
round with new ones, as a population of browser tabs is (``run_fresh_sessions_test``).

The app runs in a child process (``AppProcess``), so the memory measured is the server's
own, not that of the client threads; the child measures itself when asked.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

import gradio as gr
import numpy as np
from fastrtc import WebRTC
from gradio_client import Client, handle_file
from torch import nn

from kdcore.app.layout import AppSettings, launch_in_background

MAX_RSS_GROWTH_MB = 50.0
APP_START_TIMEOUT_S = 300.0
MEASURE_TIMEOUT_S = 120.0
RSS_SAMPLE_SECONDS = 60.0
LIVE_DRAIN_TIMEOUT_S = 90.0


@dataclass
class CallLog:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, started: float, error: Exception | None = None) -> None:
        with self.lock:
            if error is None:
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                self.errors.append(f"{type(error).__name__}: {error}"[:300])


@dataclass
class LoadReport:
    clients: int
    calls_per_client: int
    warmup_calls_per_client: int
    predict_calls: int
    predict_errors: int
    latency_ms: dict[str, float]
    throughput_per_s: float
    wall_s: float
    rss_mb: dict[str, float]
    rss_samples: list[tuple[float, float]]  # (seconds into the measured round, MB): a trend, not just two points
    grad_cam_hooks: dict[str, int]
    stream: dict[str, int]
    first_errors: list[str]

    @property
    def passed(self) -> bool:
        return (
            self.predict_errors == 0
            and self.stream["errors"] == 0
            and self.rss_mb["growth"] < MAX_RSS_GROWTH_MB
            and self.grad_cam_hooks["before"] == self.grad_cam_hooks["after"]
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "max_rss_growth_mb": MAX_RSS_GROWTH_MB}


def resident_mb() -> float:
    """This process's resident memory, after returning freed heap pages to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages otherwise; we want leaks, not slack
    except (OSError, AttributeError):
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def module_hook_count() -> int:
    """Forward/backward (pre-)hooks on every torch module alive in this process (the app's models included)."""
    with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        modules = [obj for obj in gc.get_objects() if isinstance(obj, nn.Module)]
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in modules
    )


def _serve(settings: AppSettings, conn: Connection) -> None:
    """Child process: run the app, send (URL, queue settings), then answer each ``"measure"``
    with (RSS MB, hook count) until ``"stop"``."""
    demo = launch_in_background(settings)
    conn.send((demo.local_url, queue_settings(demo)))
    streams = [block for block in demo.blocks.values() if isinstance(block, WebRTC)]
    try:
        while (request := conn.recv()) in ("measure", "connections"):
            if request == "connections":  # WebRTC peer connections still open
                conn.send(sum(len(stream.pcs) for stream in streams))
            else:
                conn.send((resident_mb(), module_hook_count(), len(demo.state_holder.session_data)))
    finally:
        demo.close()


class AppProcess:
    """The app (``kdcore.app.layout.build_demo(settings)``) served from its own process, as a context manager."""

    def __init__(self, settings: AppSettings) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no torch/OpenMP state inherited
        self._conn, self._child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(settings, self._child_conn), daemon=True)
        self.url = ""
        self.queue: dict[str, Any] = {}

    def __enter__(self) -> AppProcess:
        self._process.start()
        self._child_conn.close()  # the child holds its end: when it dies, our reads see EOF
        try:
            if not self._conn.poll(APP_START_TIMEOUT_S):
                raise RuntimeError(f"the app did not start within {APP_START_TIMEOUT_S:.0f} s")
            self.url, self.queue = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the app process ended during start-up (exit code {self._process.exitcode})") from None
        except BaseException:
            self._process.kill()
            raise
        return self

    def measure(self) -> tuple[float, int, int]:
        """(resident MB, Grad-CAM hook count, sessions held) of the serving process."""
        self._conn.send("measure")
        if not self._conn.poll(MEASURE_TIMEOUT_S):
            raise RuntimeError(f"the app process did not report its memory within {MEASURE_TIMEOUT_S:.0f} s")
        return self._conn.recv()

    def wait_for_live_connections_to_close(self, timeout_s: float = LIVE_DRAIN_TIMEOUT_S) -> int:
        """Wait until the app holds no WebRTC connection (a closed page's connection ends when
        its ICE consent expires, ~30 s later); return how many were still open at the end."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._conn.send("connections")
            if not self._conn.poll(MEASURE_TIMEOUT_S):
                raise RuntimeError("the app process did not report its connections")
            open_connections = self._conn.recv()
            if open_connections == 0 or time.monotonic() > deadline:
                return open_connections
            time.sleep(1.0)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):  # the child is already gone
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


def _predict_calls(client: Client, image: Path, calls: int, log: CallLog) -> None:
    for _ in range(calls):
        started = time.perf_counter()
        try:
            payload, *_ = client.predict(handle_file(image), api_name="/predict")
            if not isinstance(payload, dict) or not payload:
                raise ValueError(f"unexpected /predict payload {payload!r}")
            log.record(started)
        except Exception as exc:  # every failure counts; the report lists them
            log.record(started, exc)


def _stream_sessions(client: Client, clip: Path, stop: threading.Event) -> dict[str, int]:
    """Stream ``/analyse_video`` sessions back to back until ``stop``; count updates and errors."""
    counts = {"sessions": 0, "updates": 0, "errors": 0}
    while not stop.is_set() or counts["sessions"] == 0:
        try:
            job = client.submit(handle_file(clip), 0.4, api_name="/analyse_video")
            counts["updates"] += sum(1 for _ in job)
            if "Clip summary" not in str(job.result()[-1]):
                raise ValueError("stream ended without a clip summary")
        except Exception:  # counted, the session is retried
            counts["errors"] += 1
        counts["sessions"] += 1
    return counts


def _percentiles(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {"p50": float("nan"), "p95": float("nan"), "max": float("nan"), "mean": float("nan")}
    values = np.asarray(latencies_ms)
    return {
        "p50": round(float(np.percentile(values, 50)), 1),
        "p95": round(float(np.percentile(values, 95)), 1),
        "max": round(float(values.max()), 1),
        "mean": round(float(values.mean()), 1),
    }


@dataclass
class Clients:
    """The load's gradio_client sessions, kept from the warm-up to the end (as real users' are)."""

    predict: list[Client]
    stream: Client | None

    @classmethod
    def open(cls, url: str, count: int, streaming: bool) -> Clients:
        def client() -> Client:
            return Client(url, verbose=False, download_files=False)

        clients = cls([], None)
        try:
            clients.predict = [client() for _ in range(count)]
            clients.stream = client() if streaming else None
        except BaseException:
            clients.close()
            raise
        return clients

    def close(self) -> None:
        for client in [*self.predict, *([self.stream] if self.stream else [])]:
            client.close()
        self.predict, self.stream = [], None


def _round(clients: Clients, image: Path, clip: Path | None, calls: int) -> tuple[CallLog, dict[str, int], float]:
    """One round: each predict client makes ``calls`` ``/predict`` calls; streaming sessions meanwhile."""
    log, stop = CallLog(), threading.Event()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(clients.predict) + 1) as pool:
        stream = pool.submit(_stream_sessions, clients.stream, clip, stop) if clients.stream and clip else None
        for future in [pool.submit(_predict_calls, client, image, calls, log) for client in clients.predict]:
            future.result()
        stop.set()
        stream_counts = stream.result() if stream else {"sessions": 0, "updates": 0, "errors": 0}
    return log, stream_counts, time.perf_counter() - started


def _sample_rss(app: AppProcess, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    started = time.perf_counter()
    while not stop.wait(RSS_SAMPLE_SECONDS):
        samples.append((round(time.perf_counter() - started, 1), round(app.measure()[0], 1)))


def run_load_test(
    app: AppProcess, image: Path, clip: Path | None, clients: int, calls: int, warmup_calls: int | None = None
) -> LoadReport:
    """A warm-up round, then the measured round with the same client sessions.

    The warm-up (default: an eighth of the calls, at least 2) opens the sessions and lets the
    server reach its working size under this concurrency (worker threads, allocator arenas):
    growth from there on is what sustained use costs.
    """
    warmup_calls = max(2, calls // 8) if warmup_calls is None else warmup_calls
    sessions = Clients.open(app.url, clients, streaming=clip is not None)
    samples: list[tuple[float, float]] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(app, stop_sampling, samples))
    try:
        warmup, warmup_stream, _ = _round(sessions, image, clip, warmup_calls)
        rss_before, hooks_before, _ = app.measure()
        sampler.start()
        log, stream_counts, wall = _round(sessions, image, clip, calls)
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join()
        sessions.close()
    rss_after, hooks_after, _ = app.measure()
    stream_counts["errors"] += warmup_stream["errors"]
    return LoadReport(
        clients=clients,
        calls_per_client=calls,
        warmup_calls_per_client=warmup_calls,
        predict_calls=len(log.latencies_ms) + len(log.errors),
        predict_errors=len(log.errors) + len(warmup.errors),
        latency_ms=_percentiles(log.latencies_ms),
        throughput_per_s=round(len(log.latencies_ms) / wall, 2),
        wall_s=round(wall, 1),
        rss_mb={
            "before": round(rss_before, 1),
            "after": round(rss_after, 1),
            "growth": round(rss_after - rss_before, 1),
        },
        rss_samples=samples,
        grad_cam_hooks={"before": hooks_before, "after": hooks_after},
        stream=stream_counts,
        first_errors=(warmup.errors + log.errors)[:5],
    )


@dataclass
class FreshSessionsReport:
    clients: int
    calls_per_client: int
    warmup_calls_per_client: int
    rss_mb_after_warmup: float
    rounds: list[dict[str, Any]]  # per round: calls, errors, stream sessions, RSS and sessions held after it
    grad_cam_hooks: dict[str, int]
    first_errors: list[str]

    @property
    def rss_growth_mb(self) -> float:
        return round(self.rounds[-1]["rss_mb"] - self.rss_mb_after_warmup, 1)

    @property
    def passed(self) -> bool:
        errors = sum(r["predict_errors"] + r["stream_errors"] + r["live_errors"] for r in self.rounds)
        hooks_kept = self.grad_cam_hooks["before"] == self.grad_cam_hooks["after"]
        return errors == 0 and self.rss_growth_mb < MAX_RSS_GROWTH_MB and hooks_kept

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "rss_growth_mb": self.rss_growth_mb,
            "passed": self.passed,
            "max_rss_growth_mb": MAX_RSS_GROWTH_MB,
        }


@dataclass(frozen=True)
class LiveLoad:
    """Live-tab sessions from Chromium (fake camera playing ``y4m``) in each fresh-sessions round."""

    y4m: Path
    sessions: int = 2
    seconds: float = 5.0


def _round_of_new_sessions(url: str, image: Path, clip: Path | None, clients: int, calls: int, live: LiveLoad | None):
    """A round with ``clients`` new /predict sessions, a new /analyse_video one and, with ``live``,
    new browser sessions streaming the Live tab meanwhile; every session is closed after."""
    from scripts.live_browser import live_browser_sessions

    sessions = Clients.open(url, clients, streaming=clip is not None)
    with ThreadPoolExecutor(max_workers=1) as pool:
        browser = pool.submit(live_browser_sessions, url, live.y4m, live.sessions, live.seconds) if live else None
        try:
            log, stream, wall = _round(sessions, image, clip, calls)
        finally:
            sessions.close()
        live_counts = browser.result() if browser else {"sessions": 0, "errors": 0}
    return log, {**stream, "live_sessions": live_counts["sessions"], "live_errors": live_counts["errors"]}, wall


def run_fresh_sessions_test(
    app: AppProcess,
    image: Path,
    clip: Path | None,
    clients: int,
    calls: int,
    rounds: int,
    warmup_calls: int,
    live: LiveLoad | None = None,
) -> FreshSessionsReport:
    """A warm-up round, then ``rounds`` rounds, each with new client sessions; memory after each."""
    warmup, warmup_stream, _ = _round_of_new_sessions(app.url, image, clip, clients, warmup_calls, live)
    if live:
        app.wait_for_live_connections_to_close()
    rss_warm, hooks_before, _ = app.measure()
    per_round, errors = [], list(warmup.errors)
    for index in range(rounds):
        log, stream, wall = _round_of_new_sessions(app.url, image, clip, clients, calls, live)
        still_open = app.wait_for_live_connections_to_close() if live else 0
        rss, _, sessions = app.measure()
        errors += log.errors
        per_round.append(
            {
                "round": index + 1,
                "predict_calls": len(log.latencies_ms) + len(log.errors),
                "predict_errors": len(log.errors) + (len(warmup.errors) if index == 0 else 0),
                "stream_sessions": stream["sessions"],
                "stream_errors": stream["errors"] + (warmup_stream["errors"] if index == 0 else 0),
                "live_sessions": stream["live_sessions"],
                "live_errors": stream["live_errors"] + (warmup_stream["live_errors"] if index == 0 else 0),
                "latency_ms": _percentiles(log.latencies_ms),
                "wall_s": round(wall, 1),
                "rss_mb": round(rss, 1),
                "sessions_held": sessions,
                "live_connections_open_when_measured": still_open,
            }
        )
        print(
            f"round {index + 1}: RSS {rss:.1f} MB (after warm-up {rss_warm:.1f}), sessions held {sessions}", flush=True
        )
    _, hooks_after, _ = app.measure()
    return FreshSessionsReport(
        clients=clients,
        calls_per_client=calls,
        warmup_calls_per_client=warmup_calls,
        rss_mb_after_warmup=round(rss_warm, 1),
        rounds=per_round,
        grad_cam_hooks={"before": hooks_before, "after": hooks_after},
        first_errors=errors[:5],
    )


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queue_settings(demo: gr.Blocks) -> dict[str, Any]:
    """The launched app's queue: bounded size and runs per event at a time."""
    return {"max_size": demo._queue.max_size, "default_concurrency_limit": demo._queue.default_concurrency_limit}


def machine_note() -> dict[str, Any]:
    """What else the machine was doing: results on a busy machine are provisional."""
    return {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
