"""Launching the app in-process for the API and browser tests."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from kdcore.loadtest import free_local_port as free_port
from kdcore.ui import AppSettings, launch_in_background

__all__ = ["free_port", "launch"]


def launch(checkpoints: Path) -> gr.Blocks:
    """The app on a free local port, serving in a background thread; call ``.close()`` after."""
    return launch_in_background(AppSettings(checkpoints=checkpoints, port=free_port()))
