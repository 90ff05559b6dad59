"""deploy/k8s: every manifest valid against its schema (Kubernetes' own from the
kubernetes-validate package, KEDA's from tests/deploy/keda_schema.py), and the pieces wired
together: selectors, GPU limits, grace period, scrape annotations, secrets, KEDA's target."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pixelmill.settings import Settings
from tests.deploy.keda_schema import SCHEMAS

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"


def kustomization() -> dict[str, Any]:
    result: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return result


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name in kustomization()["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            if document is not None:
                found.append((name, document))
    return found


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def validate(document: dict[str, Any]) -> None:
    schema = SCHEMAS.get((document["apiVersion"], document["kind"]))
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(document)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_only_existing_ones() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize(
    ("file", "document"),
    manifests(),
    ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in manifests()],
)
def test_manifest_is_valid_against_its_schema(file: str, document: dict[str, Any]) -> None:
    validate(document)


def test_schema_validation_catches_mistakes() -> None:
    worker = by_kind("Deployment")["pixelmill-worker"]
    misspelt = yaml.safe_load(yaml.safe_dump(worker))
    misspelt["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(misspelt)
    scaled = by_kind("ScaledObject")["pixelmill-worker"]
    wrong = yaml.safe_load(yaml.safe_dump(scaled))
    wrong["spec"]["maxReplicas"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong)


def test_every_kind_used_has_a_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in manifests()}
    assert kinds >= {
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("batch/v1", "Job"),
        ("batch/v1", "CronJob"),
        ("keda.sh/v1alpha1", "ScaledObject"),
    }


def _pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    if document["kind"] == "CronJob":
        spec: dict[str, Any] = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    spec = document["spec"]["template"]["spec"]
    return spec


def test_deployment_selectors_match_their_pods() -> None:
    for name, deployment in by_kind("Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for key, value in deployment["spec"]["selector"]["matchLabels"].items():
            assert labels.get(key) == value, name
    deployments = by_kind("Deployment")
    for name, service in by_kind("Service").items():
        matched = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched, f"service {name} selects no pods"
        ports = {p["name"] for c in _pod_spec(matched[0])["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, name


def test_config_map_holds_valid_settings() -> None:
    data = by_kind("ConfigMap")["pixelmill-config"]["data"]
    values = {k.removeprefix("PIXELMILL_").lower(): v for k, v in data.items() if v != ""}
    Settings(**values, _env_file=None)  # type: ignore[call-arg]


def test_gpu_worker_has_a_gpu_and_outlives_its_longest_job() -> None:
    worker = by_kind("Deployment")["pixelmill-worker"]
    spec = _pod_spec(worker)
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = by_kind("ConfigMap")["pixelmill-config"]["data"]
    settings = Settings(  # type: ignore[call-arg]
        job_time_limit_seconds=int(config["PIXELMILL_JOB_TIME_LIMIT_SECONDS"]), _env_file=None
    )
    assert spec["terminationGracePeriodSeconds"] > settings.task_time_limit
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (
        env["PIXELMILL_METRICS_PORT"]
        == worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    )
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"] in mounts  # an emptyDir: clean at every start


def test_scaled_object_scales_the_worker_on_the_render_and_finishing_queues() -> None:
    scaled = by_kind("ScaledObject")["pixelmill-worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind("Deployment")
    trigger, finishing = scaled["spec"]["triggers"]
    config = by_kind("ConfigMap")["pixelmill-config"]["data"]
    assert trigger["metadata"]["queueName"] == config["PIXELMILL_RENDER_QUEUE"]
    # Keepers waiting to be finished start a worker too (they serve both queues).
    assert finishing["metadata"]["queueName"] == config["PIXELMILL_FINISHING_QUEUE"]
    assert finishing["metadata"]["mode"] == "QueueLength"
    assert finishing["authenticationRef"] == trigger["authenticationRef"]
    assert trigger["metadata"]["mode"] == "QueueLength"
    # The queue holds at most the dispatch window: KEDA can reach maxReplicaCount only if the
    # window holds `value` messages per replica.
    per_replica = int(trigger["metadata"]["value"])
    window = int(config["PIXELMILL_DISPATCH_WINDOW"])
    assert window >= per_replica * scaled["spec"]["maxReplicaCount"]
    auth = by_kind("TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    assert auth["spec"]["secretTargetRef"][0]["name"] == "pixelmill-secrets"


def test_every_process_with_metrics_is_scraped() -> None:
    annotated = {
        name
        for kind in ("Deployment", "Service")
        for name, doc in by_kind(kind).items()
        if (doc["spec"].get("template", {}).get("metadata", doc["metadata"]))
        .get("annotations", {})
        .get("prometheus.io/scrape")
        == "true"
        or doc["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"
    }
    assert annotated >= {
        "pixelmill-worker",
        "pixelmill-dispatcher",
        "pixelmill-review",
        "pixelmill-exporter",
    }


def test_secrets_come_from_the_generated_secret_with_every_key() -> None:
    (generator,) = kustomization()["secretGenerator"]
    assert generator["envs"] == ["secrets.env"]
    example = (K8S / "secrets.env.example").read_text()
    keys = set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    assert {"PIXELMILL_DATABASE_URL", "PIXELMILL_BROKER_URL"} <= keys
    for file, document in manifests():
        if document["kind"] in ("Deployment", "Job", "CronJob"):
            for container in _pod_spec(document)["containers"]:
                refs = [e.get("secretRef", {}).get("name") for e in container["envFrom"]]
                assert generator["name"] in refs, f"{file}: {container['name']}"
    ignored = (K8S.parent / ".gitignore").read_text().split()
    assert "k8s/secrets.env" in ignored  # the filled-in copy is never committed


def test_nightly_produce_and_migration_jobs() -> None:
    cron = by_kind("CronJob")["pixelmill-produce"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = _pod_spec(cron)["containers"]
    assert "pixelmill produce" in " ".join(container["args"])
    job = by_kind("Job")["pixelmill-migrate"]
    (container,) = _pod_spec(job)["containers"]
    assert container["args"] == ["db", "upgrade"]
