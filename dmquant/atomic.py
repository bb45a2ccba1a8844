"""Atomic directory writes and content hashes: a failed save never leaves a loadable half-write."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

MANIFEST = "quantization.json"


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` by rename.

    An existing `target` is only replaced if it is empty or a previous dmquant save, so a typo in the
    output path cannot wipe unrelated data.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise FileExistsError(f"{target} exists and is not a dmquant checkpoint; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root except the manifest itself."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def verify_tree(root: Path, expected: dict[str, str]) -> None:
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            raise ValueError(f"corrupt checkpoint {root}: missing file {rel}")
        if sha256_file(path) != digest:
            raise ValueError(f"corrupt checkpoint {root}: {rel} does not match its recorded sha256 "
                             "(truncated or modified); re-save the model")
