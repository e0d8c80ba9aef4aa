"""Settings of the service that are not pipeline settings (those are ``PipelineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from filo.settings import at_least, in_range, setting

# PIL format names the service decodes (what cameras and people send)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


@dataclass
class ServiceConfig:
    """Address, security, batching and limits of ``python -m filo serve``."""

    host: str = setting("127.0.0.1", "address to bind; anything but a loopback address exposes "
                        "the service to the network (use --token_file then)")
    port: int = setting(8000, "TCP port", check=in_range(0, 65535))
    token_file: Path | None = setting(
        None, "file holding a bearer token; every /v1 request must then send "
        "'Authorization: Bearer <token>' (the variable FILO_SERVE_TOKEN works too)",
        default_help="no token")
    out_dir: Path | None = setting(
        None, "folder of the per-request outputs (overlay and mask PNGs, result JSON)",
        default_help="$RESULTS_DIR/serve")
    keep_results: int = setting(1000, "keep the outputs of this many latest requests; older "
                                "ones are deleted", check=at_least(1))
    max_batch_size: int = setting(8, "most images in one forward pass", check=at_least(1))
    max_wait_ms: float = setting(10.0, "how long the first waiting request waits for others to "
                                 "join its batch", check=in_range(0.0, 10_000.0))
    queue_size: int = setting(64, "requests that may wait for the model; more are answered 503 "
                              "with Retry-After", check=at_least(1))
    request_timeout_s: float = setting(120.0, "a request waiting longer for its result is "
                                       "answered 504", check=in_range(0.1, 3600.0))
    max_upload_mb: float = setting(20.0, "largest request body in MiB (413 above)",
                                   check=in_range(0.01, 4096.0))
    max_image_pixels: int = setting(40_000_000, "largest width x height of an uploaded image",
                                    check=at_least(1))
    mask_threshold: float = setting(
        0.5, "map value at and above which the binary mask is set, when neither the request "
        "nor a calibrated memory bank gives one", check=in_range(0.0, 1.0))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
