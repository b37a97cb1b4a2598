"""The deployment files parse and agree with the service (BentoCloud's own schema, Kubernetes shape)."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_bentocloud_config_matches_bentomls_schema_and_the_service():
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    raw = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    config = bentoml_cattr.structure(raw, CreateDeploymentSchema)
    assert config.bento == "glm4v:latest"
    [(service_name, service)] = config.services.items()
    assert service_name == "glm4v"  # the @bentoml.service name in service.py
    assert service.instance_type and service.instance_type.startswith("gpu.")
    assert 1 <= service.scaling.min_replicas <= service.scaling.max_replicas
    concurrency = service.config_overrides["traffic"]["concurrency"]
    max_concurrency = int(next(e.value for e in config.envs if e.name == "GLM4V_MAX_CONCURRENCY"))
    assert concurrency <= max_concurrency  # replicas scale out before they start refusing


def test_kubernetes_manifest_probes_and_gpu():
    deployment, service = yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0]["containerPort"] == 3000
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 600
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
