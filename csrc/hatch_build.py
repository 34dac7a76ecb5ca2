"""Hatch build hook: compile the package's cffi extensions into the wheel.

For an editable install the modules are compiled into the source tree
(``dmoverfs/_*.so``, ignored by git), where the editable path finds them.

It also builds the preload shim ``libdmoverio.so`` (into ``csrc/shim``,
ignored by git) and writes ``dmoverio.pc``, installed as
``<prefix>/lib/pkgconfig/dmoverio.pc``. A wheel carries the shim and the C
header inside the package (``dmoverfs/lib``, ``dmoverfs/include``);
an editable install uses them from the source tree (``dmoverfs/native.py``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _load_builder(root: Path):
    return _load("dmoverfs_build_core", root / "csrc" / "build_core.py")


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
        self._shim(root, version, build_data)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def _shim(self, root: Path, version: str, build_data: dict) -> None:
        """Build libdmoverio.so; ship it, the header and dmoverio.pc."""
        shim = _load("dmoverfs_build_shim", root / "csrc" / "shim" / "build_shim.py")
        library = shim.build()
        print(f"dmoverfs: built {library.name}", file=sys.stderr)
        project_version = self.metadata.version
        if version == "editable":
            pc_text = shim.source_tree_pkg_config(project_version)
        else:
            build_data["force_include"][str(library)] = "dmoverfs/lib/libdmoverio.so"
            build_data["force_include"][str(shim.INCLUDE)] = "dmoverfs/include"
            pc_text = shim.installed_pkg_config(project_version)
        self._pc_dir = Path(tempfile.mkdtemp(prefix="dmoverfs-pc-"))
        pc_file = self._pc_dir / "dmoverio.pc"
        pc_file.write_text(pc_text)
        build_data["shared_data"][str(pc_file)] = "lib/pkgconfig/dmoverio.pc"

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        pc_dir = getattr(self, "_pc_dir", None)
        if pc_dir is not None:
            shutil.rmtree(pc_dir, ignore_errors=True)

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
