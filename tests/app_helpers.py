"""Launching the app in-process for the API and browser tests."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from kdcore.app.layout import AppSettings, launch_in_background
from scripts.loadtest import free_local_port as free_port

__all__ = ["free_port", "launch"]


def launch(checkpoints: Path, **settings) -> gr.Blocks:
    """The app on a free local port, serving in a background thread; call ``.close()`` after."""
    return launch_in_background(AppSettings(checkpoints=checkpoints, port=free_port(), **settings))
