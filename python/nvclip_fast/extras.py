"""The optional extras: what each one provides, and the ``pip install`` that adds it to this install.

The core package needs numpy and Pillow (and onnxruntime, the ``onnx`` extra, for ONNX bundles on the
CPU); everything else is an extra. Installed from a checkout (``pip install .``), the command names
that checkout, since the package index may not have this version; otherwise the index's form.
"""

from __future__ import annotations

import importlib.metadata
import json
import urllib.parse
import urllib.request

DISTRIBUTION = "nvclip-fast"
# What needs each extra, for messages: "exporting needs the 'export' extra ...".
EXPORT = "export"


def _install_origin() -> tuple[str, bool] | None:
    """(the local folder this package was installed from, editable) per PEP 610's direct_url.json,
    or None (installed from an index, or a wheel file)."""
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        origin = json.loads(text) if text else {}
    except ValueError:
        return None
    url = origin.get("url", "")
    if "dir_info" not in origin or not url.startswith("file:"):
        return None
    path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    return path, bool(origin["dir_info"].get("editable"))


def pip_install(extra: str) -> str:
    """The command that adds ``extra`` to this installation."""
    origin = _install_origin()
    if origin is None:
        return f'pip install "{DISTRIBUTION}[{extra}]"'
    path, editable = origin
    return f'pip install {"-e " if editable else ""}"{path}[{extra}]"'


def missing_extra(extra: str, what: str, error: ImportError) -> ImportError:
    """An ImportError saying that ``what`` needs ``extra`` (naming the missing module) and how to add it."""
    module = error.name or str(error)
    return ImportError(f"{what} needs the '{extra}' extra ({module} is not installed): {pip_install(extra)}")
