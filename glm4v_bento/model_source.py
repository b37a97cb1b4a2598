"""Where the model comes from: a local directory, a Hugging Face id, or a BentoML model-store tag.

``GLM4V_MODEL`` is read as:
- a local directory when it exists, or looks like a path (starts with ``/``, ``.`` or ``~``);
- a Hugging Face id when it has the ``org/name`` form;
- otherwise a BentoML model-store tag (``name`` or ``name:version``), as written by
  ``glm4v-bento import-model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glm4v_bento.config import Settings

SourceKind = Literal["local", "hub", "store"]


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    ref: str
    revision: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSource:
        return cls.parse(settings.model, settings.revision)

    @classmethod
    def parse(cls, model: str, revision: str | None = None) -> ModelSource:
        path = Path(model).expanduser()
        if path.is_dir() or model.startswith(("/", ".", "~")):
            return cls("local", str(path), None)
        if model.count("/") == 1 and ":" not in model:
            return cls("hub", model, revision)
        return cls("store", model, None)

    def bentoml_model(self) -> Any:
        """The BentoML model declaration, so that ``bentoml build`` pins and packages the model.

        A hub model is pinned to the commit its revision points at when the Bento is built;
        a model-store model is copied into the Bento. A local directory is used in place.
        """
        import bentoml

        if self.kind == "hub":
            return bentoml.models.HuggingFaceModel(self.ref, revision=self.revision or "main")
        if self.kind == "store":
            return bentoml.models.BentoModel(self.ref)
        return None

    def local_path(self, declared: Any) -> str:
        """The directory to load from, given what ``bentoml_model`` declared (resolved by BentoML)."""
        if self.kind == "local":
            if not Path(self.ref).is_dir():
                raise FileNotFoundError(f"GLM4V_MODEL={self.ref!r} is not a directory")
            return self.ref
        if self.kind == "store":
            return str(declared.path)
        return str(declared)


def revision_of(path: str, configured: str | None) -> str | None:
    """The commit a hub snapshot directory was downloaded at (``.../snapshots/<sha>``), if known."""
    local = Path(path)
    if local.parent.name == "snapshots":
        return local.name
    return configured
