"""voxport's torch-free front-end modules, shipped beside the Python-backend model as `voxport_frontend`.

The BLS model must run the very loop the runtime runs (text front end, prenet mask draws, host loop
with its stop rule and trimming, streaming windows), on a Triton server that has numpy and nothing
of voxport. So the modules are copied verbatim from this checkout; only their top-level
`from voxport.<...>.<module> import` lines are rewritten to this flat package (`from .<module>
import`), plus two small shims of our own: `_pinyin` (pypinyin when the server has it, else a pass-
through for text without Han characters) and `_runner` (the `Runner` type alias, whose home module
imports the records). Imports inside functions are left as written: they load voxport's PyTorch
helpers and run only when a torch object is passed in, which the Python backend never does.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from voxport.errors import PackageError

PACKAGE = "voxport_frontend"
_ROOT = Path(__file__).resolve().parents[2]  # the voxport package (the repository root)
_SHIMS_DIR = Path(__file__).resolve().parent / "python_model"

# Shipped module -> its source in voxport, copied verbatim but for the import lines.
MODULES = {
    "errors": "errors.py",
    "text": "models/text.py",
    "synthesizer_config": "models/synthesizer_config.py",
    "synthesizer_io": "models/synthesizer_io.py",
    "prenet_masks": "models/prenet_masks.py",
    "synthesizer_loop": "runtime/synthesizer_loop.py",
    "streaming": "runtime/streaming.py",
}
# Top-level imports of modules not shipped -> the shim that stands in for them.
SHIMS = {"pypinyin": "_pinyin", "base": "_runner"}

_VOXPORT_IMPORT = re.compile(r"^from voxport\.(?:[\w.]+\.)?(\w+) import ")
_OTHER_IMPORT = re.compile(r"^from (pypinyin) import ")


def rewrite(source: str, origin: str) -> str:
    """`source` with its top-level voxport (and pypinyin) imports pointing into the shipped package."""
    out = []
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        match = _VOXPORT_IMPORT.match(line) or _OTHER_IMPORT.match(line)
        if match:
            module = match.group(1)
            target = module if module in MODULES else SHIMS.get(module)
            if target is None:
                raise PackageError(f"{origin}:{number} imports {module}, which the Triton Python model does not "
                                   f"ship (shipped: {', '.join(MODULES)}); add it to export/triton/frontend.py")
            line = f"from .{target} import " + line[match.end():]
        elif line.startswith(("import voxport", "import torch", "from torch")):
            raise PackageError(f"{origin}:{number}: a top-level `{line.strip()}` cannot ship to the Python backend")
        out.append(line)
    return "".join(out)


def write_frontend(model_version_dir: Path) -> dict[str, str]:
    """Write `<model_version_dir>/voxport_frontend/`; returns {shipped file: source path and sha256}."""
    package = Path(model_version_dir) / PACKAGE
    package.mkdir(parents=True)
    provenance: dict[str, str] = {}
    (package / "__init__.py").write_text(
        '"""voxport\'s torch-free front end, copied by `voxport package format=triton` (see each file\'s header)."""\n')
    for module, relative in MODULES.items():
        source = (_ROOT / relative).read_text()
        digest = hashlib.sha256(source.encode()).hexdigest()
        header = (f"# Copied verbatim from voxport/{relative} (sha256 {digest[:16]}) by `voxport package`;\n"
                  f"# only top-level voxport imports were rewritten to this package.\n")
        (package / f"{module}.py").write_text(header + rewrite(source, relative))
        provenance[f"{module}.py"] = f"voxport/{relative} sha256 {digest}"
    for shim in sorted(set(SHIMS.values())):
        (package / f"{shim}.py").write_text((_SHIMS_DIR / f"{shim}.py").read_text())
        provenance[f"{shim}.py"] = f"voxport/export/triton/python_model/{shim}.py (shim)"
    return provenance
