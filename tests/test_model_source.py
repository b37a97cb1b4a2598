"""How GLM4V_MODEL is read: local directory, hub id, or model-store tag; and what a hub model
that cannot be fetched says."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub import constants, errors

from glm4v_bento.devserver import Server
from glm4v_bento.model_source import ModelSource, download_failure, revision_of


def test_existing_directory_is_local(tiny_model_dir):
    assert ModelSource.parse(str(tiny_model_dir)).kind == "local"


@pytest.mark.parametrize("path", ["./models/x", "/nonexistent/model", "~/models/glm"])
def test_path_like_values_are_local_even_if_missing(path):
    source = ModelSource.parse(path)
    assert source.kind == "local"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        source.local_path(None)
    with pytest.raises(FileNotFoundError, match="not a directory"):  # when the service is defined
        source.bentoml_model()


def test_an_existing_file_is_a_local_path_and_not_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("not a model")
    source = ModelSource.parse("notes.md")  # before: read as a model-store tag, "not found locally"
    assert source.kind == "local"
    with pytest.raises(FileNotFoundError, match=r"'notes\.md' is not a directory; a local model is a checkpoint"):
        source.bentoml_model()


def test_a_directory_without_config_json_is_not_a_checkpoint(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        ModelSource.parse(str(tmp_path)).bentoml_model()
    assert ModelSource.parse(str(tiny_model_dir)).bentoml_model() is None


def test_org_slash_name_is_a_hub_id():
    source = ModelSource.parse("zai-org/GLM-4.1V-9B-Thinking", revision="abc123")
    assert (source.kind, source.ref, source.revision) == ("hub", "zai-org/GLM-4.1V-9B-Thinking", "abc123")


@pytest.mark.parametrize("tag", ["glm4v-tiny", "glm4v-tiny:latest", "glm4v-tiny:d6sxj5xjsobb4ax4"])
def test_other_names_are_model_store_tags(tag):
    assert ModelSource.parse(tag).kind == "store"


def test_hub_model_is_declared_for_bentoml_with_its_revision():
    import bentoml

    declared = ModelSource.parse("zai-org/GLM-4.1V-9B-Thinking", revision="v1").bentoml_model()
    assert isinstance(declared, bentoml.models.HuggingFaceModel)
    assert (declared.model_id, declared.revision) == ("zai-org/GLM-4.1V-9B-Thinking", "v1")
    assert ModelSource.parse("zai-org/GLM-4.1V-9B-Thinking").bentoml_model().revision == "main"


def test_store_model_is_declared_as_a_bento_model():
    import bentoml

    declared = ModelSource.parse("glm4v-tiny:v1").bentoml_model()
    assert isinstance(declared, bentoml.models.BentoModel)
    assert str(declared.tag) == "glm4v-tiny:v1"


def test_revision_is_read_from_a_hub_snapshot_path(tmp_path):
    snapshot = tmp_path / "models--zai-org--GLM" / "snapshots" / "0123abcd"
    assert revision_of(str(snapshot), "main") == "0123abcd"
    assert revision_of(str(tmp_path), "main") == "main"


def _http_error(kind: type) -> OSError:
    request = httpx.Request("GET", "https://huggingface.co/api/models/zai-org/GLM-4.1V-9B-Thinking")
    return kind("404 Client Error", response=httpx.Response(404, request=request))


@pytest.mark.parametrize(
    ("error", "offline", "reason"),
    [
        (lambda: _http_error(errors.GatedRepoError), False, "gated: accept its terms on the Hub, then set HF_TOKEN"),
        (lambda: _http_error(errors.RepositoryNotFoundError), False, "no such model, or it is private"),
        (lambda: _http_error(errors.RevisionNotFoundError), False, "no revision 'v9' (GLM4V_REVISION)"),
        (lambda: errors.LocalEntryNotFoundError("x"), False, "could not be reached (check the network"),
        (lambda: errors.LocalEntryNotFoundError("x"), True, "HF_HUB_OFFLINE is set and the local cache has no copy"),
        (lambda: OSError(28, "No space left on device"), False, "OSError: [Errno 28] No space left on device"),
    ],
)
def test_a_failed_download_says_why_and_what_to_do_instead(monkeypatch, error, offline, reason):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    message = str(download_failure("zai-org/GLM-4.1V-9B-Thinking", "v9", error()))
    assert message.startswith("cannot fetch GLM4V_MODEL='zai-org/GLM-4.1V-9B-Thinking' (revision v9)")
    assert reason in message and "set GLM4V_MODEL to a local directory or a model-store tag" in message


def test_serving_a_hub_model_that_cannot_be_fetched_stops_with_one_clear_message(tmp_path):
    """The real `bentoml serve`, offline (as the test server always is) and with an empty cache."""
    cache = str(tmp_path / "hub-cache")
    server = Server("zai-org/GLM-4.1V-9B-Thinking", tmp_path / "serve.log", HF_HOME=cache, BENTOML_HF_CACHE_DIR=cache)
    log = server.failed_start_log()
    last_line = log.strip().splitlines()[-1]
    assert last_line.startswith("glm4v_bento.model_source.ModelDownloadError: cannot fetch GLM4V_MODEL=")
    assert "HF_HUB_OFFLINE is set and the local cache has no copy" in last_line
    assert log.count("Traceback") == 1  # the download's own chained tracebacks are left out


def test_the_command_line_names_a_model_path_that_is_no_checkpoint(capsys):
    from glm4v_bento import cli

    assert cli.main(["generate", "--model", "/nonexistent/model", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: GLM4V_MODEL='/nonexistent/model' is not a directory")


def test_serving_a_model_path_that_is_no_checkpoint_stops_at_once_with_one_clear_message(tmp_path):
    server = Server(tmp_path, tmp_path / "serve.log")  # a directory, but no config.json in it
    last_line = server.failed_start_log().strip().splitlines()[-1]
    expected = f"GLM4V_MODEL={str(tmp_path)!r} has no config.json: it is not a checkpoint directory"
    assert last_line == f"FileNotFoundError: {expected}"
