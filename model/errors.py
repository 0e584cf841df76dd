"""Errors raised by ``model/``. ``app/errors.py`` maps them to HTTP status codes."""


class ModelError(Exception):
    """Base class of every error ``model/`` raises on purpose."""


class CheckpointError(ModelError):
    """A model file is missing, corrupt, unsafe or does not fit the architecture."""


class WeightsUnavailableError(ModelError):
    """Pretrained torchvision weights are neither cached nor downloadable."""


class InvalidImageError(ModelError):
    """An image tensor or file is not something the predictor can run on."""


class InvalidOptionError(ModelError):
    """A prediction option has a value outside its documented range."""


class DatasetError(ModelError):
    """A COCO dataset is malformed. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []
