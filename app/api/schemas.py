"""Wire schemas. Requests are named for what they do
(``SegmentRequest``), responses carry the ``Public`` suffix."""

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    field_validator,
    model_validator,
)

from model import ModelInfo, PredictOptions


def printable(text: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("control characters (NUL, newlines, ...) are not allowed")
    return text


# a string that is stored: no control characters (PostgreSQL refuses NUL in text)
Printable = Annotated[str, AfterValidator(printable)]


class MaskFormat(enum.StrEnum):
    """How masks are returned: COCO compressed RLE, polygons, or not at all."""

    RLE = "rle"
    POLYGON = "polygon"
    NONE = "none"


class SegmentOptions(BaseModel):
    """Per-request options: the one schema of the multipart form fields (a form
    model), the JSON keys, and ``maskrcnn predict``'s options."""

    score_threshold: float = Field(0.5, ge=0, le=1, description="keep detections scoring ≥ this")
    iou_threshold: float = Field(0.5, ge=0, le=1, description="per-class NMS IoU threshold")
    mask_threshold: float = Field(0.5, ge=0, le=1, description="binarise soft masks at this")
    max_detections: int = Field(100, ge=0, le=1000, description="per image, best first")
    classes: list[int | str] | None = Field(
        None,
        description="only these class ids or names (default: all); in a form, repeat the "
        "field or separate them with commas",
    )
    mask_format: MaskFormat = Field(
        MaskFormat.RLE, description="`rle` (COCO compressed RLE), `polygon` or `none`"
    )
    model: Printable | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="run on this model (an id from GET /v1/models, or a built-in) instead "
        "of the active one; loaded on first use and kept among the last "
        "MODEL_CACHE_SIZE used",
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """``"cat,dog"`` (a form field, a command-line option) is two classes."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        parts = [p for v in value for p in (v.split(",") if isinstance(v, str) else [v])]
        kept = [p.strip() if isinstance(p, str) else p for p in parts]
        return [p for p in kept if p != ""] or None

    def for_model(self, info: ModelInfo) -> PredictOptions:
        """The model's own options: class names and ids resolved against ``info``'s
        classes (``InvalidOptionError`` for one it does not have)."""
        classes = info.resolve_classes(self.classes) if self.classes else None
        return PredictOptions(
            score_threshold=self.score_threshold,
            iou_threshold=self.iou_threshold,
            mask_threshold=self.mask_threshold,
            max_detections=self.max_detections,
            classes=classes,
            mask_format=str(self.mask_format),  # the plain value: it crosses to model processes
        )


# The two shapes of an ``ImageSource``, named in the OpenAPI document (added to its
# components by ``app.api.openapi``), so generated clients get ImageUrl and
# ImageData classes; neither takes the other's key.
IMAGE_SHAPES = {
    "ImageUrl": {
        "type": "object",
        "title": "ImageUrl",
        "description": "an image fetched from an http(s) URL",
        "properties": {"url": {"type": "string", "description": "http(s) URL of the image"}},
        "required": ["url"],
        "additionalProperties": False,
    },
    "ImageData": {
        "type": "object",
        "title": "ImageData",
        "description": "an image sent inline",
        "properties": {
            "data": {"type": "string", "description": "base64 of a JPEG, PNG, WebP or BMP file"}
        },
        "required": ["data"],
        "additionalProperties": False,
    },
}


def _as_one_of_the_image_shapes(schema: dict[str, Any]) -> None:
    """The document says "exactly one" too, so clients and generators know; each
    key is the string its shape says (not ``string | null``), so a reader that merges
    the object with either shape (ReDoc) finds no conflicting types."""
    schema["properties"] = {
        key: value for shape in IMAGE_SHAPES.values() for key, value in shape["properties"].items()
    }
    schema["oneOf"] = [{"$ref": f"#/components/schemas/{name}"} for name in IMAGE_SHAPES]


class ImageSource(BaseModel):
    """One image: exactly one of ``url`` or ``data`` (base64 of the file's bytes)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_as_one_of_the_image_shapes)

    url: str | None = Field(None, description="http(s) URL of the image")
    data: str | None = Field(None, description="base64 of a JPEG, PNG, WebP or BMP file")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageSource":
        if (self.url is None) == (self.data is None):
            raise ValueError("give exactly one of `url` or `data`")
        return self


class SegmentRequest(SegmentOptions):
    images: list[ImageSource] = Field(min_length=1, description="images, answered in order")


# a Triton model's name: a folder name and a URL part
TRITON_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

MODEL_KIND = (
    "`demo`: the bundled model, which knows only synthetic shapes (circles, squares, "
    "triangles...), not photos; `coco`: torchvision's COCO weights; `custom`: a "
    "checkpoint trained here or brought"
)


class ModelRefPublic(BaseModel):
    id: str
    architecture: str
    kind: Literal["demo", "coco", "custom"] = Field(description=MODEL_KIND)


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
    """Milliseconds. The stages are each the slowest image's of the request (its
    images may run in different batches), so they need not add up to ``total``."""

    queue: float = Field(description="waiting in the queue for a batch to start")
    inference: float = Field(description="the forward of the image's batch, device work included")
    postprocess: float = Field(description="mask encoding of the image's batch")
    total: float = Field(
        description="the request in this server, from its arrival to its answer: reading "
        "and decoding the upload (or fetching its URLs) and the stages above"
    )


class SegmentationPublic(BaseModel):
    model: ModelRefPublic
    results: list[ImageResultPublic] = Field(description="one per input image, in order")
    timing_ms: TimingPublic


class ClassPublic(BaseModel):
    id: int
    name: str


class ModelMetricsPublic(RootModel[dict[str, Any]]):
    """A trained version's last validation: ``bbox`` and ``segm`` COCO stats, losses."""


class ModelPublic(BaseModel):
    """A model this deployment can serve: a registry version (``model-…``), a
    built-in (``demo``, ``coco``, ``coco-v2``) or the start-up model."""

    id: str
    architecture: str
    kind: Literal["demo", "coco", "custom"] = Field(description=MODEL_KIND)
    classes: list[ClassPublic] = Field(description="without the background")
    device: str | None = Field(None, description="where it runs; null when not loaded here")
    precision: str | None = Field(
        None, description="`fp32`, `fp16`, `bf16`: what runs; null when not loaded here"
    )
    runtime: str | None = Field(
        None, description="`torch` or `openvino`: what runs it; null when not loaded here"
    )
    active: bool = Field(description="whether /v1/segment on this replica serves it now")
    metrics: ModelMetricsPublic | None = Field(
        None, description="evaluation of a trained version (COCO bbox/segm mAP, losses)"
    )
    base_model: str | None = Field(None, description="what a trained version started from")
    job_id: str | None = Field(None, description="the training job that made it")
    dataset_id: str | None = Field(None, description="the dataset it was trained on")
    created_at: datetime | None = Field(None, description="registration time (UTC)")


class ModelsPublic(BaseModel):
    data: list[ModelPublic] = Field(description="one page of `count`")
    count: int = Field(description="models in all")


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessPublic(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelRefPublic
    device: str = Field(description="where the served model runs: `cpu`, `cuda:0`, ...")
    runtime: str = Field(description="what runs its network: `torch` or `openvino`")
    precision: str = Field(description="in what precision: `fp32`, `fp16` or `bf16`")


class ErrorDetailPublic(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. `queue_full`")
    message: str
    request_id: str


class ErrorPublic(BaseModel):
    error: ErrorDetailPublic


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` entries documenting the error shape for ``statuses``."""
    return {status: {"model": ErrorPublic} for status in statuses}


# -- training jobs ----------------------------------------------------


class JobState(enum.StrEnum):
    """A training job's state; ``succeeded``, ``failed`` and ``cancelled`` are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CocoStatsPublic(RootModel[dict[str, float]]):
    """COCOeval's 12 stats by name (``AP``, ``AP50``, ... ``ARl``; -1 where undefined)."""


class TrainingJobConfig(BaseModel):
    """How a job trains. Every field has a default; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    base_model: Printable = Field(
        "demo",
        min_length=1,
        max_length=64,
        description="`demo` (bundled, works offline), `coco`, `coco-v2`, `scratch` (random "
        "`maskrcnn_small_fpn`) or a registry model id from GET /v1/models",
    )
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(
        4, ge=1, le=64, description="images per optimizer step, in each of the `processes`"
    )
    learning_rate: float = Field(
        0.01,
        gt=0,
        le=1,
        description="peak SGD learning rate; linear warm-up over a tenth of the steps "
        "(at most 200), then cosine decay",
    )
    image_size: int | None = Field(
        None,
        ge=32,
        le=2048,
        description="shorter side images are resized to (longer ≤ 5/3 of it); null: the "
        "base model's own (256 for demo, 800 for coco)",
    )
    val_fraction: float = Field(
        0.1, ge=0, le=0.5, description="share of images held out for per-epoch COCO mAP; 0: none"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="validation split and initialisation")
    processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="training processes, one DDP run under torchrun (nccl on GPUs, gloo on the "
        "CPU), each with its shard of every epoch; at most the worker's GPUs, or its cores "
        "on the CPU (`JOB_MAX_PROCESSES`)",
    )


class TrainingJobCreate(TrainingJobConfig):
    dataset_id: Printable = Field(min_length=1, max_length=64, description="from POST /v1/datasets")


class TrainingProgressPublic(BaseModel):
    epoch: int = Field(0, description="the epoch running (1-based); 0 before the first step")
    epochs: int
    step: int = Field(0, description="optimizer steps done, all epochs together")
    total_steps: int | None = None
    loss: float | None = Field(None, description="mean training loss of the last 20 steps")
    eta_s: float | None = Field(None, description="estimated seconds of training left")


class EpochMetricsPublic(BaseModel):
    """One finished epoch. ``bbox`` and ``segm`` hold COCOeval's 12 stats (``AP``,
    ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``,
    ``ARs``, ``ARm``, ``ARl``; -1 where undefined) on the validation split."""

    epoch: int
    losses: dict[str, float | None] = Field(description="the epoch's mean training losses")
    bbox: CocoStatsPublic | None = Field(None, description="null without a validation split")
    segm: CocoStatsPublic | None = Field(None, description="null without a validation split")


class TrainingJobPublic(BaseModel):
    id: str
    state: JobState = Field(description="queued → running → succeeded | failed | cancelled")
    dataset_id: str
    config: TrainingJobConfig
    progress: TrainingProgressPublic
    metrics: list[EpochMetricsPublic] = Field(description="one entry per finished epoch")
    model_id: str | None = Field(None, description="the registered model, once succeeded")
    error: str | None = Field(None, description="why the job failed")
    cancel_requested: bool
    worker_id: str | None = Field(None, description="host:pid:tag of the worker that ran it")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class TrainingJobsPublic(BaseModel):
    data: list[TrainingJobPublic] = Field(description="newest first; one page of `count`")
    count: int = Field(description="jobs (in the asked state) in all")


# -- datasets -------------------------------------------------------------


class DatasetPublic(BaseModel):
    """A stored COCO dataset that passed every check; training jobs name it by ``id``."""

    id: str = Field(description="`ds-…`")
    name: str
    num_images: int
    num_annotations: int
    categories: list[ClassPublic] = Field(description="category ids and names, by id")
    size_bytes: int = Field(description="the extracted files on disk")
    created_at: datetime = Field(description="upload time (UTC)")


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic] = Field(description="newest first; one page of `count`")
    count: int = Field(description="datasets in all")
