"""What the service tells clients about the model it runs."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from model.errors import InvalidOptionError

ModelKind = Literal["demo", "coco", "custom"]

# The models every installation can name: the bundled demo and torchvision's COCO
# weights (``model.weights.PRETRAINED``). Specs add ``auto`` (COCO's weights when
# cached, else the demo); a training job's base model adds ``scratch``.
BUILTIN_MODELS = ("demo", "coco", "coco-v2")
MODEL_SPECS = ("auto", *BUILTIN_MODELS)
BASE_MODELS = ("scratch", *BUILTIN_MODELS)


def spec_names(names: tuple[str, ...]) -> str:
    """``names`` for a help text or an error: "auto, demo, coco, coco-v2"."""
    return ", ".join(names)


@dataclass(frozen=True)
class ModelInfo:
    """Identity and class table of a loaded network.

    ``class_ids[label]`` and ``class_names[label]`` describe the network's output
    label ``label``; index 0 is the background. Class ids are the dataset's
    category ids (COCO category ids for COCO models), so they may have gaps.
    """

    id: str
    architecture: str
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    # what kind of model: the bundled ``demo`` (synthetic shapes only), torchvision's
    # ``coco`` weights, or a ``custom`` checkpoint (trained here or brought)
    kind: ModelKind = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if len(self.class_ids) != len(self.class_names):
            raise ValueError(
                f"class_ids has {len(self.class_ids)} entries but class_names has "
                f"{len(self.class_names)}"
            )

    @property
    def num_classes(self) -> int:
        """Number of network outputs, background included."""
        return len(self.class_ids)

    def resolve_classes(self, wanted: Iterable[int | str]) -> frozenset[int]:
        """Map class ids or names to network labels; unknown entries are an error."""
        by_id = {cid: label for label, cid in enumerate(self.class_ids) if label}
        by_name = {name: label for label, name in enumerate(self.class_names) if label}
        labels, unknown = set(), []
        for item in wanted:
            key = item.strip() if isinstance(item, str) else item
            if isinstance(key, str) and key.lstrip("-").isdigit():
                key = int(key)
            if isinstance(key, int) and key in by_id:
                labels.add(by_id[key])
            elif isinstance(key, str) and key in by_name:
                labels.add(by_name[key])
            else:
                unknown.append(str(item))
        if unknown:
            raise InvalidOptionError(
                f"unknown classes {unknown}; expected class ids or names of model {self.id!r}"
            )
        return frozenset(labels)


def default_class_table(num_classes: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Ids 0..n-1 named ``background``, ``class_1``, ... for files without names."""
    ids = tuple(range(num_classes))
    names = ("background", *(f"class_{i}" for i in range(1, num_classes)))
    return ids, names


def read_classes_file(path: str, num_classes: int) -> tuple[str, ...]:
    """One class name per line, index 0 is the background; must match ``num_classes``."""
    from model.errors import CheckpointError

    try:
        with open(path, encoding="utf-8") as f:
            names = tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise CheckpointError(f"classes file {path}: cannot read it ({e.strerror})") from e
    if len(names) != num_classes:
        raise CheckpointError(
            f"classes file {path}: has {len(names)} names but the model has "
            f"{num_classes} classes (background first, one name per line)"
        )
    return names


def class_table_from_metadata(classes: Sequence[dict]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``[{"id": 3, "name": "square"}, ...]`` (without background) to a full table."""
    ids = (0, *(int(c["id"]) for c in classes))
    names = ("background", *(str(c["name"]) for c in classes))
    return ids, names
