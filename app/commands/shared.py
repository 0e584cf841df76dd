"""What several commands share (not a command itself): their ``--help``
format, and the model a command is given, resolved as ``maskrcnn serve``
resolves ``MASKRCNN_MODEL``: a built-in name, a checkpoint file, or a registry
model id (``model-…``, read from the database and ``DATA_DIR`` the
``MASKRCNN_*`` settings name)."""

import argparse


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
    names = "scratch, coco, coco-v2, demo" if scratch else "auto, coco, coco-v2, demo"
    return resolve_model_spec(settings, names=names)
