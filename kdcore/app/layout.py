"""The Gradio interface: four tabs wired to the top-level handlers of ``kdcore.app.handlers``.
``app.py`` only parses the CLI.

Models are loaded once in ``build_demo`` and bound to the handlers with ``functools.partial``;
per-user state lives in ``gr.State`` (the analysed image, the live session), never in module
globals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from fastrtc import VideoStreamHandler, WebRTC
from gradio.components import Component
from gradio.data_classes import ImageData

from kdcore.app import handlers
from kdcore.app.about import about_markdown
from kdcore.app.batch import MAX_BATCH_FILES
from kdcore.app.live_session import LiveSession
from kdcore.app.patches.queue_hygiene import bound_queue_bookkeeping
from kdcore.app.patches.webrtc_quality import LIVE_RTP_PARAMS, LIVE_TRACK_CONSTRAINTS, raise_server_video_bitrate
from kdcore.app.report import REPORT_FORMATS
from kdcore.app.service import DEFAULT_CHECKPOINT_DIR, DISCLAIMER, ROLES, LoadedModels, load_models
from kdcore.app.video import MAX_CLIP_SECONDS, MAX_VIDEO_BYTES, TIMELINE_X, TIMELINE_Y, VIDEO_SUFFIXES
from kdcore.config import CLASS_NAMES, REPO_ROOT
from kdcore.imaging import IMAGE_SUFFIXES
from kdcore.malloc_tuning import limit_malloc_arenas
from kdcore.overlay import colour_scale_html

logger = logging.getLogger(__name__)

ASSETS_DIR = REPO_ROOT / "assets"
MAX_UPLOAD = f"{MAX_VIDEO_BYTES // 2**20}mb"  # the largest thing anyone uploads is a clip
BROWSER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
DEFAULT_OPACITY = 0.4
ROI_SIDES = ("left", "top", "right", "bottom")
# Uploads and overlays may be patient images: every 10 minutes delete those older than
# 10 minutes, and all of them when the server stops.
CACHE_CLEANUP_SECONDS = (600, 600)
# One run at a time per event (2 CPU cores; Grad-CAM is serialised per model anyway), and a
# bounded queue: a request beyond it is refused at once ("queue full") instead of waiting minutes.
MAX_QUEUED_REQUESTS = 64
# Every browser tab and API client is a session, and Gradio keeps each one (a copy of the app's
# config plus its gr.State values, ~1-2 MB here) until 10,000 newer ones exist: bound it. The
# least recently used session goes first; its next call simply starts a new one (a local demo
# has a handful of users; an evicted tab only loses its opacity slider's last image).
MAX_SESSIONS = 16
# The analysed image behind the opacity slider: forgotten 10 minutes after the last analysis.
STATE_TTL_SECONDS = 600


@dataclass(frozen=True)
class AppSettings:
    checkpoints: Path = DEFAULT_CHECKPOINT_DIR
    examples_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    max_sessions: int = MAX_SESSIONS


LIVE_BUTTON_LABELS = {"start": "Start live analysis", "stop": "Stop", "waiting": "Connecting…"}
# FastRTC mirrors its preview whenever the stream is not open, whatever ``mirror_webcam`` says:
# the picture flipped left-right at start and stop. Ultrasound is never shown mirrored.
APP_CSS = "#live-stream video.flip { transform: none !important; }"


def launch_options(settings: AppSettings) -> dict[str, Any]:
    """Keyword arguments for ``demo.launch``: local only, no share link, bounded uploads."""
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": False,
        "max_file_size": MAX_UPLOAD,
        "show_error": False,
        "state_session_capacity": settings.max_sessions,
    }


def launch_in_background(settings: AppSettings) -> gr.Blocks:
    """The app on ``settings``' address, served from a background thread; call ``.close()`` after."""
    demo = build_demo(settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    return demo


def upload_box(label: str, suffixes: tuple[str, ...], elem_id: str, **kwargs: Any) -> gr.File:
    """A file box for these suffixes that hands its handler the upload's path."""
    return gr.File(label=label, file_types=list(suffixes), type="filepath", elem_id=elem_id, **kwargs)


def in_arrival_order(box_id: str) -> dict[str, Any]:
    """Event settings that put a box's upload, clear and example events in one queue of one
    worker: they run in the order they were sent, so a clear handled late cannot blank the
    result of the file dropped after it."""
    return {"concurrency_id": box_id, "concurrency_limit": 1}


# Gradio's file box sends its clear event twice per ✕, the second only once the first has been
# answered: a file dropped at once may be in the box by then, and that late clear would blank its
# result. So each clear first asks the browser whether the box is still empty.
BOX_STILL_EMPTY_JS = "(still_empty, box) => [box === null || box === undefined]"


def clear_events(box: gr.File | gr.Image, empty: Callable[[], Sequence[Any]], outputs: list[Component]) -> None:
    """Clearing ``box`` sets ``outputs`` to ``empty()``; a clear that arrives after a new file
    changes nothing. The box is no input: Gradio refuses an event whose input box is uploading
    (clicking ✕ and dropping a new file at once starts that upload before the clear runs)."""
    still_empty = gr.Checkbox(value=True, visible=False)
    box.clear(
        partial(handlers.cleared, empty), [still_empty], [box, *outputs], js=BOX_STILL_EMPTY_JS,
        show_progress="hidden", show_api=False, **in_arrival_order(box.elem_id),
    )  # fmt: skip


def image_drop_box(**kwargs: Any) -> gr.Image:
    """``gr.Image`` (type="filepath") that hands an uploaded file to ``read_grey_image`` unopened.

    Plain ``gr.Image`` first opens the file with PIL and answers a non-image with Gradio's
    generic error; this one lets our reader name the problem, exactly as the file box does.
    (An instance override: subclassing a Gradio component writes a ``.pyi`` beside this module.
    It holds while the box is only an input: Gradio rebuilds components it updates as outputs.)
    Gradio has already checked that ``payload.path`` lies in its upload folder.
    """
    box = gr.Image(type="filepath", image_mode=None, **kwargs)
    gradio_preprocess = box.preprocess

    def preprocess(payload: ImageData | None) -> str | None:
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        try:  # a pasted image arrives as a data URL, which Gradio decodes to a file
            return gradio_preprocess(payload)
        except Exception as exc:  # Gradio and PIL raise many types for a bad data URL
            raise gr.Error(f"The pasted image could not be read ({type(exc).__name__}).") from exc

    box.preprocess = preprocess
    return box


EXAMPLES_NOTE = "Examples: synthetic speckle phantoms drawn by our code (no patient images)"


def example_caption(path: str) -> str:
    """``phantom_round_lesion.png`` -> "synthetic phantom: round lesion"; other files keep their name."""
    stem = Path(path).stem
    if stem.startswith("phantom_"):
        return "synthetic phantom: " + stem.removeprefix("phantom_").replace("_", " ")
    return Path(path).name


def example_files(settings: AppSettings, suffixes: tuple[str, ...]) -> list[str]:
    """Our generated assets plus the user's ``--examples-dir``, filtered by suffix."""
    folders = [ASSETS_DIR, *([settings.examples_dir] if settings.examples_dir else [])]
    return [
        str(path)
        for folder in folders
        if folder.is_dir()
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in suffixes
    ]


@dataclass
class ComparisonPanel:
    """Teacher and student side by side: summary line, probabilities, Grad-CAM overlay."""

    summaries: list[gr.Markdown]
    labels: list[gr.Label]
    overlays: list[gr.Image]
    agreement: gr.Markdown

    @property
    def text_outputs(self) -> list[gr.components.Component]:
        """In the order of ``handlers.summary_values``."""
        return [*self.summaries, *self.labels, self.agreement]


def comparison_panel(prefix: str) -> ComparisonPanel:
    """Built inside the current layout; element ids start with ``prefix`` (one panel per tab)."""
    summaries, labels, overlays = [], [], []
    with gr.Row(equal_height=True):
        for role in ROLES:
            with gr.Column():
                summaries.append(gr.Markdown(f"**{role.capitalize()}**", elem_id=f"{prefix}-{role}-summary"))
                overlays.append(
                    gr.Image(
                        label=f"{role.capitalize()} Grad-CAM",
                        interactive=False,
                        format="png",
                        elem_id=f"{prefix}-{role}-overlay",
                    )
                )
                # No heading: the verdict (the operating point's rule, not always the top class)
                # is the line above; a second, argmax heading could contradict it.
                labels.append(
                    gr.Label(label=f"{role.capitalize()} probabilities", num_top_classes=3, show_heading=False)
                )
    gr.HTML(colour_scale_html(), elem_id=f"{prefix}-cam-scale")
    agreement = gr.Markdown(elem_id=f"{prefix}-agreement")
    return ComparisonPanel(summaries, labels, overlays, agreement)


def _image_tab(models: LoadedModels, settings: AppSettings) -> None:
    analysis_state = gr.State(None, time_to_live=STATE_TTL_SECONDS)
    with gr.Row():
        with gr.Column(scale=1):
            uploaded = upload_box(
                "Ultrasound image: drop or click (PNG, JPEG, BMP, TIFF, WebP, GIF or DICOM)",
                IMAGE_SUFFIXES,
                "image-file",
            )
            with gr.Accordion("…or paste an image from the clipboard", open=False):
                pasted = image_drop_box(label="Paste here", sources=["clipboard"], elem_id="image-paste")
            opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Grad-CAM opacity")
            explained = gr.Radio(
                [handlers.EXPLAIN_PREDICTED, *CLASS_NAMES], value=handlers.EXPLAIN_PREDICTED,
                label="Grad-CAM explains (both models)", elem_id="image-explain",
            )  # fmt: skip
            images = example_files(settings, BROWSER_IMAGE_SUFFIXES)
            examples = gr.Examples(
                images,
                inputs=[uploaded],
                label=EXAMPLES_NOTE,
                example_labels=[example_caption(path) for path in images],
            )
        with gr.Column(scale=2):
            panel = comparison_panel("image")
            with gr.Row():
                report_format = gr.Radio(list(REPORT_FORMATS), value="pdf", label="Case report format")
                save_report = gr.Button("Save case report")
                report_file = gr.File(label="Case report", interactive=False, elem_id="image-report")
            with gr.Accordion("Result as JSON (what the /predict API returns)", open=False):
                result_json = gr.JSON(show_label=False)

    api_outputs = [result_json, *panel.overlays, analysis_state]
    page_update = partial(handlers.page_prediction, models)
    page_outputs = [*api_outputs, *panel.text_outputs]
    for source, api_name in ((uploaded, "predict"), (pasted, "predict_image")):
        # upload, not change: a change event fired while a new file is still uploading made
        # Gradio toast "Waiting for file(s) to finish uploading" each time an image was replaced.
        source.upload(
            page_update, [source, opacity, explained], page_outputs, api_name=f"{api_name}_page", show_api=False,
            **in_arrival_order(source.elem_id),
        )  # fmt: skip
        clear_events(source, handlers.empty_page, page_outputs)
        # The API endpoint: the same analysis, refusals raised as errors for the client.
        gr.Button(visible=False).click(
            partial(handlers.predict, models), [source, opacity], api_outputs, api_name=api_name
        )
    examples.load_input_event.then(
        page_update, [uploaded, opacity, explained], page_outputs, show_api=False, **in_arrival_order(uploaded.elem_id)
    )
    explained.change(
        partial(handlers.explain, models), [analysis_state, explained, opacity],
        [*panel.overlays, analysis_state, *panel.text_outputs], show_api=False,
    )  # fmt: skip
    save_report.click(
        partial(handlers.case_report, models), [analysis_state, opacity, report_format], [report_file], show_api=False
    )
    gr.Button(visible=False).click(
        partial(handlers.case_report_for_file, models), [uploaded, opacity, report_format], [report_file],
        api_name="report",
    )  # fmt: skip
    opacity.change(
        handlers.overlay_values, [analysis_state, opacity], panel.overlays, api_name="image_opacity", show_api=False
    )


def _live_tab(models: LoadedModels) -> None:
    if models.student_cam is None:
        gr.Markdown("The live view needs the student checkpoint, which is not loaded.")
        return
    session = gr.State(LiveSession())
    with gr.Row():
        with gr.Column(scale=2):
            stream = WebRTC(
                label="Live scan: student + Grad-CAM on every frame",
                mode="send-receive",
                modality="video",
                mirror_webcam=False,
                track_constraints=LIVE_TRACK_CONSTRAINTS,
                rtp_params=LIVE_RTP_PARAMS,
                full_screen=False,
                button_labels=LIVE_BUTTON_LABELS,
                elem_id="live-stream",
            )
        with gr.Column(scale=1):
            live_label = gr.Label(
                label="Student (live) probabilities", num_top_classes=3, show_heading=False, elem_id="live-label"
            )
            live_stats = gr.Markdown("Press the camera button to start.", elem_id="live-stats")
            opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Grad-CAM opacity")
            smoothing = gr.Slider(0.0, 0.95, value=0.6, step=0.05, label="Temporal smoothing of probabilities")
            with gr.Accordion("Region of interest (crop the scanner's interface)", open=False):
                crops = [gr.Slider(0, 45, value=0, step=1, label=f"Crop {side} %") for side in ROI_SIDES]
                crop_preview = gr.Image(
                    label="What the crop keeps (last frame)", interactive=False, height=160, elem_id="live-roi-preview"
                )
            freeze = gr.Button("Freeze frame — ask the teacher", variant="primary")
    gr.Markdown(
        "### Frozen frame: teacher vs student\nThis one frame, without temporal smoothing: its numbers can "
        "differ from the smoothed live panel above."
    )
    panel = comparison_panel("frozen")

    stream.stream(
        fn=VideoStreamHandler(partial(handlers.live_frame, models), fps=30, skip_frames=True),
        inputs=[stream, session, opacity, smoothing, *crops],
        outputs=[stream],
        time_limit=None,
        concurrency_limit=2,
    )
    stream.on_additional_outputs(handlers.live_panel, outputs=[live_label, live_stats])
    for crop in crops:
        crop.change(handlers.roi_preview, [session, *crops], [crop_preview], show_api=False)
    stream.stop_recording(handlers.live_stopped, None, [live_label, live_stats], show_api=False)
    freeze.click(
        partial(handlers.ask_teacher, models),
        [session, opacity],
        [*panel.overlays, *panel.text_outputs],
        api_name="ask_teacher",
    )


def _video_tab(models: LoadedModels, settings: AppSettings) -> None:
    review = gr.State(None, time_to_live=STATE_TTL_SECONDS)
    with gr.Row():
        with gr.Column(scale=1):
            clip = upload_box("Cine loop (mp4, avi, mov, gif)", VIDEO_SUFFIXES, "video-file")
            opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Grad-CAM opacity")
            run = gr.Button("Analyse clip", variant="primary")
            clips = example_files(settings, VIDEO_SUFFIXES)
            examples = gr.Examples(
                clips, inputs=[clip], label=EXAMPLES_NOTE, example_labels=[example_caption(c) for c in clips]
            )
        with gr.Column(scale=2):
            frame = gr.Image(label="Student + Grad-CAM, at the clip's pace", interactive=False, format="jpeg")
            progress = gr.Markdown(elem_id="video-status")
    timeline = gr.LinePlot(
        x=TIMELINE_X, y=TIMELINE_Y, color="class", y_lim=[0, 1], label="Per-frame class probabilities (student)"
    )
    seek = gr.Slider(
        0.0,
        MAX_CLIP_SECONDS,
        value=0.0,
        step=0.1,
        label="Show the frame at (s) — after the analysis",
        elem_id="video-seek",
    )
    summary = gr.Markdown(elem_id="video-summary")
    per_frame = gr.File(label="Per-frame results (CSV)", interactive=False, elem_id="video-csv")
    panel = comparison_panel("video")

    review_outputs = [frame, progress, timeline, per_frame, review, *panel.overlays, *panel.text_outputs, summary]
    # upload and clear, not change: as on the Image tab, an event reading the box while a new
    # file uploads makes Gradio toast "Waiting for file(s)"; a cleared clip leaves no stale review.
    in_order = in_arrival_order(clip.elem_id)
    clip.upload(handlers.clip_preview, [clip], [frame, progress], api_name="clip_preview", show_api=False, **in_order)
    examples.load_input_event.then(handlers.clip_preview, [clip], [frame, progress], show_api=False, **in_order)
    clear_events(clip, handlers.empty_clip_review, review_outputs)
    run.click(partial(handlers.analyse_video, models), [clip, opacity], review_outputs, api_name="analyse_video")
    seek.release(
        partial(handlers.video_frame_at, models), [review, seek, opacity], [frame, progress], api_name="video_frame"
    )


def _batch_tab(models: LoadedModels) -> None:
    gr.Markdown(
        f"Drop many images or a **zip** (up to {MAX_BATCH_FILES} images). When the zip has `benign/`, "
        "`malignant/` and `normal/` folders, the metrics below are those of `train.py evaluate`."
    )
    with gr.Row():
        files = upload_box("Images or a zip", (*IMAGE_SUFFIXES, ".zip"), "batch-files", file_count="multiple")
        with gr.Column():
            run = gr.Button("Analyse all", variant="primary")
            table_csv = gr.File(label="Results (CSV)", interactive=False, elem_id="batch-csv")
    table = gr.Dataframe(label="One row per file (click a column to sort)", interactive=False, elem_id="batch-table")
    with gr.Row():
        metrics = gr.Markdown(elem_id="batch-metrics")
        confusion = gr.Image(label="Confusion matrix", type="filepath", interactive=False, elem_id="batch-confusion")
    run.click(
        partial(handlers.analyse_batch, models), [files], [table, table_csv, metrics, confusion], api_name="batch"
    )


def build_demo(settings: AppSettings = AppSettings()) -> gr.Blocks:
    """The whole app; starts even when checkpoints are missing, and says so at the top."""
    limit_malloc_arenas()  # before the server's threads start
    models = load_models(settings.checkpoints)
    for problem in models.problems:
        logger.warning(problem)
    raise_server_video_bitrate()
    with gr.Blocks(
        title="Breast ultrasound KD demo", analytics_enabled=False, delete_cache=CACHE_CLEANUP_SECONDS, css=APP_CSS
    ) as demo:
        gr.Markdown("# Breast ultrasound: offline teacher vs distilled real-time MobileNetV3 student\n" + DISCLAIMER)
        if models.problems:
            gr.Markdown(models.status_markdown, elem_id="model-status")
        with gr.Tab("Image"):
            _image_tab(models, settings)
        with gr.Tab("Live"):
            _live_tab(models)
        with gr.Tab("Video"):
            _video_tab(models, settings)
        with gr.Tab("Batch"):
            _batch_tab(models)
        with gr.Tab("About"):
            gr.Markdown(about_markdown(models))
    document_public_api_only(demo)
    return bound_queue_bookkeeping(demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUED_REQUESTS))


PUBLIC_API = ("predict", "predict_image", "analyse_video", "video_frame", "ask_teacher", "batch", "report")


def document_public_api_only(demo: gr.Blocks) -> None:
    """The API page lists what a user calls; FastRTC's internal events (``set_input_gradio*``,
    ``handler``...) and the page's own updates stay callable but undocumented."""
    for fn in demo.fns.values():
        if fn.api_name not in PUBLIC_API:
            fn.show_api = False
