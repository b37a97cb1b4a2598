"""How GLM4V_MODEL is read: local directory, hub id, or model-store tag."""

from __future__ import annotations

import pytest

from glm4v_bento.model_source import ModelSource, revision_of


def test_existing_directory_is_local(tiny_model_dir):
    assert ModelSource.parse(str(tiny_model_dir)).kind == "local"


@pytest.mark.parametrize("path", ["./models/x", "/nonexistent/model", "~/models/glm"])
def test_path_like_values_are_local_even_if_missing(path):
    source = ModelSource.parse(path)
    assert source.kind == "local"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        source.local_path(None)


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
