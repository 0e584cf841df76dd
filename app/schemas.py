"""Wire schemas (SPEC §4). Requests are named for what they do
(``SegmentRequest``), responses carry the ``Public`` suffix."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MaskFormat = Literal["rle", "polygon", "none"]


class SegmentOptions(BaseModel):
    """Per-request options; the same names as multipart form fields and JSON keys."""

    score_threshold: float = Field(0.5, ge=0, le=1, description="keep detections scoring ≥ this")
    iou_threshold: float = Field(0.5, ge=0, le=1, description="per-class NMS IoU threshold")
    mask_threshold: float = Field(0.5, ge=0, le=1, description="binarise soft masks at this")
    max_detections: int = Field(100, ge=0, le=1000, description="per image, best first")
    classes: list[int | str] | None = Field(
        None, description="only these class ids or names (default: all)"
    )
    mask_format: MaskFormat = Field(
        "rle", description="`rle` (COCO compressed RLE), `polygon` or `none`"
    )


class ImageSource(BaseModel):
    """One image: exactly one of ``url`` or ``data`` (base64 of the file's bytes)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="http(s) URL of the image")
    data: str | None = Field(None, description="base64 of a JPEG, PNG, WebP or BMP file")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageSource":
        if (self.url is None) == (self.data is None):
            raise ValueError("give exactly one of `url` or `data`")
        return self


class SegmentRequest(SegmentOptions):
    images: list[ImageSource] = Field(min_length=1, description="images, answered in order")


class ModelRefPublic(BaseModel):
    id: str
    architecture: str


class RleMaskPublic(BaseModel):
    """COCO compressed RLE; ``pycocotools.mask.decode`` reads it as is."""

    size: list[int] = Field(description="[height, width]", min_length=2, max_length=2)
    counts: str


class DetectionPublic(BaseModel):
    class_id: int = Field(description="dataset category id (COCO ids for COCO models)")
    class_name: str
    score: float
    box: list[float] = Field(
        min_length=4,
        max_length=4,
        description="[x1, y1, x2, y2] in pixels of the EXIF-upright input image",
    )
    mask: RleMaskPublic | list[list[float]] | None = Field(
        None, description="RLE, polygons [[x0, y0, x1, y1, ...], ...], or null for `none`"
    )


class ImageResultPublic(BaseModel):
    width: int
    height: int
    detections: list[DetectionPublic]


class TimingPublic(BaseModel):
    """Milliseconds; per stage the slowest image of the request."""

    queue: float
    inference: float
    postprocess: float
    total: float


class SegmentationPublic(BaseModel):
    model: ModelRefPublic
    results: list[ImageResultPublic] = Field(description="one per input image, in order")
    timing_ms: TimingPublic


class ClassPublic(BaseModel):
    id: int
    name: str


class ModelPublic(BaseModel):
    id: str
    architecture: str
    classes: list[ClassPublic] = Field(description="without the background")
    device: str
    precision: str
    active: bool = Field(description="whether /v1/segment serves it")


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessPublic(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelRefPublic


class ErrorDetailPublic(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. `queue_full`")
    message: str
    request_id: str


class ErrorPublic(BaseModel):
    error: ErrorDetailPublic


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` entries documenting the error shape for ``statuses``."""
    return {status: {"model": ErrorPublic} for status in statuses}
