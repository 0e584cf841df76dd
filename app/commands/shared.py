"""What several commands share (not a command itself): their ``--help``
format, and the model a command is given, resolved as ``maskrcnn serve``
resolves ``MASKRCNN_MODEL``: a built-in name, a checkpoint file, or a registry
model id (``model-…``, read from the database and ``DATA_DIR`` the
``MASKRCNN_*`` settings name)."""

import argparse

from model import BASE_MODELS, MODEL_SPECS, spec_names

RUNTIME_HELP = "what runs the network: auto (OpenVINO on the CPU, torch on a GPU), torch, openvino"
PRECISION_HELP = (
    "fp32; fp16 or bf16 on a GPU; bf16 or int8 on a CPU with the units for them (OpenVINO)"
)


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def resolve_model(spec: str, *, scratch: bool = False) -> tuple[str, str | None]:
    """``(spec for model.load_model, model id or None)``. With ``scratch`` (a
    training base model), ``scratch`` is taken too and ``auto`` is not offered."""
    from app.settings import SettingsError, load_settings
    from app.store.registry import resolve_model_spec

    if scratch and spec == "scratch":
        return spec, None
    try:
        settings = load_settings(model=spec)
    except SettingsError as e:
        raise SystemExit(f"maskrcnn: {e}") from None
    names = spec_names(BASE_MODELS if scratch else MODEL_SPECS)
    return resolve_model_spec(settings, names=names)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of a command that runs a model as ``maskrcnn serve`` does."""
    parser.add_argument(
        "--model",
        default="auto",
        help=f"{spec_names(MODEL_SPECS)}, a checkpoint file or a registry model id",
    )
    parser.add_argument("--classes-file", help="class names, one per line (background first)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--runtime", default="auto", choices=["auto", "torch", "openvino"], help=RUNTIME_HELP
    )
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"], help=PRECISION_HELP
    )
    parser.add_argument(
        "--calibration-images",
        help="int8: a folder of images like those to predict, to calibrate on "
        "(default: a registry model's dataset, the demo's synthetic scenes)",
    )


def load_predictor_from(args: argparse.Namespace):
    """The ``model.Predictor`` of ``add_model_options``' options, loaded as ``maskrcnn
    serve`` loads its model (``app.serving.loading``: a registry id read from the
    database, OpenVINO's converted graphs kept under ``DATA_DIR``)."""
    from app.serving.loading import load_predictor, model_spec
    from app.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            model=args.model,
            classes_file=args.classes_file,
            device=args.device,
            runtime=args.runtime,
            precision=args.precision,
            calibration_images=args.calibration_images,
        )
    except SettingsError as e:
        raise SystemExit(f"maskrcnn: {e}") from None
    return load_predictor(model_spec(settings))
