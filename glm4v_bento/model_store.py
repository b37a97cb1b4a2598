"""Put a local checkpoint into the BentoML model store, so a Bento can carry it.

``glm4v-bento import-model PATH --name NAME`` is the way to ship a local or fine-tuned
checkpoint: serve it with ``GLM4V_MODEL=NAME`` (or ``NAME:VERSION``), and ``bentoml build``
copies it into the Bento.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


class ImportError_(ValueError):
    """The directory is not a checkpoint that can be imported."""


def import_model(path: str | Path, name: str, *, progress: bool = True) -> str:
    """Copy the checkpoint at ``path`` into the model store as ``name``; return the new tag."""
    import bentoml
    from tqdm import tqdm

    source = Path(path).expanduser()
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ImportError_(f"{source} is not a model checkpoint (no config.json in it)")
    config = json.loads(config_file.read_text())
    files = sorted(f for f in source.rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in files)
    metadata = {
        "source_path": str(source.resolve()),
        "architectures": config.get("architectures", []),
        "files": len(files),
        "bytes": total,
    }
    with (
        bentoml.models.create(name, labels={"project": "glm4v-bento"}, metadata=metadata) as model,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"importing {source.name}", disable=not progress) as bar,
    ):
        for file in files:
            target = Path(model.path) / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            with file.open("rb") as reader, target.open("wb") as writer:
                while chunk := reader.read(_CHUNK):
                    writer.write(chunk)
                    bar.update(len(chunk))
            shutil.copystat(file, target)
    return str(model.tag)
