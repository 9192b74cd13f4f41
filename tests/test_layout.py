"""The tree shows the layering: the run time (daemon, enrollment, the top level of models/) needs no torch.

The offline tools live in ``models/training`` (train, export, calibrate) and ``models/evaluation``
(``cryid eval``). A fresh interpreter in which torch, torchaudio and speechbrain cannot be imported (a
``sys.meta_path`` finder refuses them, as on a base install without the ``train`` extra) loads every
module of ``cryid run`` and ``cryid enroll`` and runs ``cryid enroll list``: torch is never asked for,
and of the offline subpackages only the settings that the ``cryid`` command builds its options from are
loaded. A second test reads the imports themselves, so a new module-level import is caught even in a
module the first test's commands would not reach.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE_LIBRARIES = ("torch", "torchaudio", "speechbrain", "hyperpyyaml", "onnx", "onnxscript")
OFFLINE_PACKAGES = ("cryid.models.training", "cryid.models.evaluation")
# pydantic settings of `cryid model train|calibrate`: the `cryid` parser reads their defaults and descriptions
CLI_SETTINGS = {"cryid.models.training", "cryid.models.training.settings"}

_BLOCKED_RUN = """
import importlib, json, sys
from pathlib import Path

BLOCKED = ("torch", "torchaudio", "speechbrain")
refused = []


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            refused.append(name)
            raise ImportError(f"{name} is blocked: the run time must not need it")
        return None


sys.meta_path.insert(0, Refuse())
names = []
for package, skip in (("cryid.daemon", ()), ("cryid.enrollment", ()), ("cryid.models", ("__init__",))):
    folder = Path(importlib.import_module(package).__file__).parent
    names += [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem not in skip]
for name in names:
    importlib.import_module(name)
from cryid.daemon.cli import main

code = main(["enroll", "list", "--json"])
loaded = sorted(
    m for m in sys.modules
    if m.split(".")[0] in BLOCKED or m.startswith(("cryid.models.training", "cryid.models.evaluation"))
)
print(json.dumps({"modules": names, "enroll_list": code, "refused": refused, "loaded": loaded}))
"""


def test_run_and_enroll_load_without_torch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYID_")}
    env["CRYID_STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the walk reached the stages `cryid run` builds and the commands `cryid enroll` dispatches to
    assert {
        "cryid.daemon.service",
        "cryid.daemon.live",
        "cryid.daemon.sources",
        "cryid.enrollment.cli",
        "cryid.enrollment.enroll",
        "cryid.models.embedder",
        "cryid.models.cli",
    } <= set(result["modules"])
    assert result["enroll_list"] == 0
    assert result["refused"] == [], f"the run time tried to import {result['refused']}"
    assert set(result["loaded"]) <= CLI_SETTINGS, "the run time loaded offline code"


def _imports(node: ast.AST) -> list[str]:
    """Modules named by one import statement."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Imports run when the module is imported: its body, including ``if``/``try`` blocks, but not
    function or class bodies and not ``if TYPE_CHECKING:``."""
    found: list[str] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        stmt = todo.pop()
        found += _imports(stmt)
        if isinstance(stmt, ast.If) and not (
            isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING"
        ):
            todo += stmt.body + stmt.orelse
        elif isinstance(stmt, ast.Try):
            todo += stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body]
        elif isinstance(stmt, ast.With):
            todo += stmt.body
    return found


def test_run_time_modules_import_no_offline_code() -> None:
    """models/*.py (top level) import neither torch & co nor the offline subpackages when imported;
    daemon/ and enrollment/ never import the offline subpackages, not even inside a function."""
    bad: list[str] = []
    for path in sorted((REPO / "models").glob("*.py")):
        for name in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name.split(".")[0] in OFFLINE_LIBRARIES or name.startswith(OFFLINE_PACKAGES):
                bad.append(f"{path.relative_to(REPO)}: {name}")
    for folder in ("daemon", "enrollment"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                bad += [
                    f"{path.relative_to(REPO)}: {n}" for n in _imports(node) if n.startswith(OFFLINE_PACKAGES)
                ]
    assert bad == []
    # the reader sees what it must: module-level imports, also under if/try, but not inside functions
    sample = "import torch\nif X:\n    from speechbrain.a import b\ndef f():\n    import onnx\n"
    assert sorted(_module_level_imports(ast.parse(sample))) == ["speechbrain.a", "speechbrain.a.b", "torch"]
    # the offline subpackages exist and hold what moved there
    assert (REPO / "models" / "training" / "train.py").is_file()
    assert (REPO / "models" / "evaluation" / "evaluate.py").is_file()


def test_the_enrollment_layers_view_of_the_settings_is_the_daemons() -> None:
    """``cryid enroll`` types its settings with protocols (it cannot import the daemon's ``Settings``):
    every property they name is a field of ``Settings`` with the same type."""
    import typing

    from cryid.daemon.config import Settings
    from cryid.enrollment.config import EnrollmentSettings, RegistryPlace, RegistrySettings
    from cryid.models.config import EmbedderSettings, SegmenterSettings

    names = {
        "Path": Path,
        "RegistrySettings": RegistrySettings,
        "SegmenterSettings": SegmenterSettings,
        "EmbedderSettings": EmbedderSettings,
    }
    seen = set()
    for proto in (RegistryPlace, EnrollmentSettings):
        for cls in proto.__mro__:
            for name, member in vars(cls).items():
                if isinstance(member, property):
                    wanted = typing.get_type_hints(member.fget, localns=names)["return"]
                    assert Settings.model_fields[name].annotation is wanted, name
                    seen.add(name)
    assert seen == {"state_dir", "registry", "room", "model", "segmenter", "embedder"}
