"""``model``'s public surface: every name in ``__all__`` resolves, lazily, and the
service (``app/``) imports nothing else from ``model``."""

import ast
import subprocess
import sys
from pathlib import Path

import model

REPO = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves_to_its_module_object():
    assert sorted(model.__all__) == sorted(model._MODULES)
    for name in model.__all__:
        value = getattr(model, name)
        module = sys.modules[model._MODULES[name]]
        assert value is getattr(module, name)


def test_import_model_imports_no_torch():
    code = "import sys, model; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr


def test_app_imports_model_only_through_its_public_surface():
    reaching_in = []
    for path in sorted((REPO / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            reaching_in += [
                f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("model.")
            ]
    assert reaching_in == []
