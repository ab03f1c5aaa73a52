"""A slim amd-aiter wheel: only what the aiter backend loads off ROCm (its Triton kernels), for offline machines.

    python -m atom_trio.ops.aiter.slim_wheel amd_aiter-0.1.7.post2.dev18-py3-none-any.whl OUT_DIR

The published wheel is ~40 MB, nearly all of it the HIP/CK sources that AITER
JIT-builds on ROCm (``aiter_meta/``). Off ROCm the loader imports only
``aiter/ops/triton/`` (kernels, utilities, tuned tile tables), so the slim
wheel keeps that, the ``__init__.py`` files that make ``aiter`` and
``aiter.ops`` packages (never run off ROCm: the loader stands in for them),
and the metadata, under the same name and version. It installs with
``pip install --no-index --no-deps --target DIR``. It cannot serve ROCm,
which needs the whole wheel.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

from .loader import TRITON_PACKAGE

KEPT_PREFIXES = (TRITON_PACKAGE.replace(".", "/") + "/",)
KEPT_FILES = ("aiter/__init__.py", "aiter/ops/__init__.py")


def kept(name: str) -> bool:
    """Whether the slim wheel keeps the published wheel's member ``name``."""
    if ".dist-info/" in name:
        return not name.endswith("/RECORD")
    return name in KEPT_FILES or (name.startswith(KEPT_PREFIXES) and "__pycache__" not in name)


def slim(wheel: Path, out_dir: Path) -> Path:
    """Write the slim wheel of ``wheel`` into ``out_dir`` (same file name) with a RECORD of what it holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    if target.resolve() == wheel.resolve():
        raise ValueError(f"{target} would overwrite the wheel it is made from: choose another directory")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as slimmed:
        members = [info for info in source.infolist() if not info.is_dir() and kept(info.filename)]
        (record,) = [info.filename for info in source.infolist() if info.filename.endswith(".dist-info/RECORD")]
        lines = []
        for info in members:
            data = source.read(info)
            slimmed.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        slimmed.writestr(record, "\n".join(lines) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit(__doc__.strip().splitlines()[2])
    target = slim(Path(args[0]), Path(args[1]))
    print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
