"""`glm4v-bento build`: build the Bento with its model pinned.

The Bento must serve exactly the model it was built with, so the build bakes
GLM4V_MODEL (and GLM4V_REVISION) into the Bento's environment:
- a model-store name becomes its full ``name:version`` tag (the model is copied in);
- a Hugging Face id gets the commit its revision points at now (asks the hub);
- a local directory cannot travel inside a Bento: import it into the model store first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from glm4v_bento.config import Settings
from glm4v_bento.model_source import ModelSource

REPO = Path(__file__).resolve().parent.parent


class BuildError(RuntimeError):
    """The Bento cannot be built as asked; the message says what to do instead."""


def pin_model(source: ModelSource) -> tuple[str, str | None]:
    """(GLM4V_MODEL, GLM4V_REVISION) that name exactly one model version."""
    if source.kind == "local":
        raise BuildError(
            f"GLM4V_MODEL={source.ref} is a local directory, which a Bento cannot carry. Import it first:\n"
            f"  glm4v-bento import-model {source.ref} --name NAME\nthen build with GLM4V_MODEL=NAME"
        )
    if source.kind == "store":
        import bentoml
        from bentoml.exceptions import NotFound

        try:
            return str(bentoml.models.get(source.ref).tag), None
        except NotFound:
            raise BuildError(
                f"model {source.ref!r} is not in the BentoML model store (`bentoml models list`)"
            ) from None
    from huggingface_hub import HfApi

    try:
        commit = HfApi().model_info(source.ref, revision=source.revision or "main").sha
    except Exception as exc:
        raise BuildError(f"could not resolve {source.ref}@{source.revision or 'main'} on the hub: {exc}") from exc
    return source.ref, commit


def build_bento(settings: Settings) -> str:
    """Run `bentoml build` with the model pinned; return the Bento tag."""
    model, revision = pin_model(ModelSource.from_settings(settings))
    print(f"building the Bento for {model}" + (f" at {revision}" if revision else ""), file=sys.stderr)
    env = {**os.environ, "GLM4V_MODEL": model}
    env.pop("GLM4V_REVISION", None)
    if revision:
        env["GLM4V_REVISION"] = revision
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", str(REPO)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise BuildError(f"bentoml build failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    for line in done.stdout.splitlines():
        if line.startswith("__tag__:"):
            return line.removeprefix("__tag__:").strip()
    raise BuildError(f"bentoml build printed no tag:\n{done.stdout[-2000:]}")


def settings_inside_bento(settings: Settings, service_dir: Path) -> Settings:
    """Inside a built Bento, serve the model the Bento was built with.

    A container gets the pinned GLM4V_MODEL/GLM4V_REVISION as environment variables, but
    `bentoml serve <bento tag>` on a machine does not; there the Bento's own record
    (``bento.yaml`` beside the ``src`` folder) is read instead. Outside a Bento: unchanged.
    """
    record = service_dir.parent / "bento.yaml"
    if service_dir.name != "src" or not record.is_file():
        return settings
    import yaml

    envs = {e["name"]: e.get("value") for e in (yaml.safe_load(record.read_text()) or {}).get("envs") or []}
    if "GLM4V_MODEL" not in envs:
        return settings
    pinned = {"model": envs["GLM4V_MODEL"], "revision": envs.get("GLM4V_REVISION") or None}
    if (settings.model, settings.revision) != (pinned["model"], pinned["revision"]) and "GLM4V_MODEL" in os.environ:
        print(
            f"note: this Bento was built for {pinned['model']}; ignoring GLM4V_MODEL={settings.model}",
            file=sys.stderr,
        )
    return settings.model_copy(update=pinned)
