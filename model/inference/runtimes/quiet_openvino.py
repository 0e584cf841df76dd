"""OpenVINO without its usage telemetry. ``import openvino`` loads
``openvino_telemetry``, which, unless the machine's user once ran ``opt_in_out
--opt_out``, sends every model conversion to Google Analytics and writes a client
id under ``$HOME/intel``. A server should do neither, so that module is made
unimportable before OpenVINO loads, and OpenVINO's converter uses its own no-op
stub instead (it also saves ~0.2 s per conversion). The service imports OpenVINO
through here only: ``from model.inference.runtimes.quiet_openvino import ov``."""

import sys

if "openvino" not in sys.modules:  # too late otherwise: a caller loaded it already
    sys.modules.setdefault("openvino_telemetry", None)

import openvino as ov

__all__ = ["ov"]
