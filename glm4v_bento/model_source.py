"""Where the model comes from: a local directory, a Hugging Face id, or a BentoML model-store tag.

``GLM4V_MODEL`` is read as:
- a local directory when it exists, or looks like a path (starts with ``/``, ``.`` or ``~``),
  checked when the service is defined (a directory holding config.json);
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
        if path.exists() or model.startswith(("/", ".", "~")):
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
        self.checked_directory()  # when the service is defined: a wrong path stops the server at once
        return None

    def checked_directory(self) -> str:
        """A local model's directory, once it is seen to be a checkpoint (a directory with config.json)."""
        path = Path(self.ref)
        if not path.is_dir():
            raise FileNotFoundError(
                f"GLM4V_MODEL={self.ref!r} is not a directory; a local model is a checkpoint directory "
                "(config.json, weights, tokenizer)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"GLM4V_MODEL={self.ref!r} has no config.json: it is not a checkpoint directory")
        return self.ref

    def local_path(self, declared: Any) -> str:
        """The directory to load from, given what ``bentoml_model`` declared (resolved by BentoML)."""
        if self.kind == "local":
            return self.checked_directory()
        if self.kind == "store":
            return str(declared.path)
        return str(declared)


class ModelDownloadError(RuntimeError):
    """A hub model could not be fetched: what went wrong and what to do instead, in one message."""


def download_failure(model_id: str, revision: str, error: OSError) -> ModelDownloadError:
    """The error to stop the server with when ``snapshot_download`` of the hub model failed."""
    from huggingface_hub import constants, errors

    if isinstance(error, errors.GatedRepoError):
        why = "the model is gated: accept its terms on the Hub, then set HF_TOKEN"
    elif isinstance(error, errors.RepositoryNotFoundError):
        why = "the Hub has no such model, or it is private (check the id; set HF_TOKEN for a private one)"
    elif isinstance(error, errors.RevisionNotFoundError):
        why = f"the model has no revision {revision!r} (GLM4V_REVISION)"
    elif isinstance(error, errors.LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set and the local cache has no copy"
    elif isinstance(error, errors.LocalEntryNotFoundError):  # what no network gives
        why = "the Hub could not be reached (check the network, HF_ENDPOINT) and the local cache has no copy"
    else:  # a disk that filled up, an HTTP error...
        lines = str(error).strip().splitlines()
        why = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return ModelDownloadError(
        f"cannot fetch GLM4V_MODEL={model_id!r} (revision {revision}) from the Hugging Face Hub: {why}. "
        "To serve a copy on this machine instead, set GLM4V_MODEL to a local directory or a model-store tag "
        "(glm4v-bento import-model); `make demo` serves the offline tiny model."
    )


def revision_of(path: str, configured: str | None) -> str | None:
    """The commit a hub snapshot directory was downloaded at (``.../snapshots/<sha>``), if known."""
    local = Path(path)
    if local.parent.name == "snapshots":
        return local.name
    return configured
