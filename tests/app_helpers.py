"""Launching the app in-process for the API and browser tests."""

from __future__ import annotations

import socket
from pathlib import Path

import gradio as gr

from kdcore.ui import AppSettings, build_demo, launch_options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(checkpoints: Path) -> gr.Blocks:
    """The app on a free local port, serving in a background thread; call ``.close()`` after."""
    settings = AppSettings(checkpoints=checkpoints, port=free_port())
    demo = build_demo(settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    return demo
