"""Hatch build hook: compile the package's cffi extensions into the wheel.

For an editable install the modules are compiled into the source tree
(``dmoverfs/_*.so``, ignored by git), where the editable path finds them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _load_builder(root: Path):
    spec = importlib.util.spec_from_file_location("dmoverfs_build_core", root / "csrc" / "build_core.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


class CoreBuildHook(BuildHookInterface):
    """Builds the C extensions with cffi and ships them as ``dmoverfs/_<name><EXT_SUFFIX>``."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        for builder in _load_builder(root).builders():
            target = self._compile(builder, root / "dmoverfs")
            if version != "editable":
                build_data["force_include"][str(target)] = f"dmoverfs/{target.name}"
            print(f"dmoverfs: built {target.name} with {sys.executable}", file=sys.stderr)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    @staticmethod
    def _compile(builder, package: Path) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix="dmoverfs-build-"))
        try:
            built = Path(builder.compile(tmpdir=str(tmp), verbose=False))
            module = built.name.split(".", 1)[0]
            for stale in package.glob(f"{module}.*.so"):
                stale.unlink()
            target = package / built.name
            shutil.copy2(built, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
