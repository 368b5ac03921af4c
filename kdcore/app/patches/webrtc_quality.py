"""WebRTC settings that keep the live ultrasound image faithful at 30 FPS.

Speckle is fine, high-frequency texture: at WebRTC's default bitrates (aiortc's VP8 encoder
caps at 1.5 Mbit/s, Chrome starts low and may halve the resolution) it turns to mush. On a
loopback or LAN link bandwidth is plentiful, so both directions are allowed far more.
"""

from __future__ import annotations

import aiortc.codecs.h264
import aiortc.codecs.vpx

LIVE_WIDTH, LIVE_HEIGHT, LIVE_FPS = 640, 480, 30
SERVER_VIDEO_BITRATE = 6_000_000  # bit/s, server -> browser (the overlay stream)
BROWSER_VIDEO_BITRATE = 6_000_000  # bit/s, browser -> server (the camera)

LIVE_TRACK_CONSTRAINTS = {
    "width": {"ideal": LIVE_WIDTH},
    "height": {"ideal": LIVE_HEIGHT},
    "frameRate": {"ideal": LIVE_FPS},
}
# Merged into the browser's RTCRtpSender parameters: keep full resolution and send up to
# BROWSER_VIDEO_BITRATE instead of scaling the camera down when the estimate dips.
LIVE_RTP_PARAMS = {
    "degradationPreference": "maintain-resolution",
    "encodings": [{"active": True, "maxBitrate": BROWSER_VIDEO_BITRATE, "scaleResolutionDownBy": 1.0}],
}


def raise_server_video_bitrate(bitrate: int = SERVER_VIDEO_BITRATE) -> None:
    """Let aiortc's encoders start at ``bitrate`` and never drop below a third of it.

    aiortc reads these module constants when it sets a bitrate; it has no per-connection
    setting, so this is process-wide by nature.
    """
    for codec in (aiortc.codecs.vpx, aiortc.codecs.h264):
        codec.DEFAULT_BITRATE = bitrate
        codec.MIN_BITRATE = bitrate // 3
        codec.MAX_BITRATE = max(codec.MAX_BITRATE, bitrate)
