"""The Helm chart (helm/ditmesh), checked with no cluster: lint, render, validate, assert.

Every rendering (the defaults, each examples/ file, and a few variants) is linted with
`helm lint --strict`, and every manifest is validated strictly against Kubernetes 1.35
(`kubernetes-validate`) or, for custom resources, against the published CRD schemas kept
in helm/crd-schemas/ (tools/crd_schema.py). Then the rendered objects are asserted on:
RBAC, probes, GPU counts against the gang's degrees, NetworkPolicy, security contexts,
and the `ditmesh serve` arguments parsed by the real CLI parser.

helm comes from `make chart-tools` (tools/fetch_helm.py puts it in the venv); without it,
or without kubernetes-validate, these tests are skipped, saying so.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "ditmesh"
CRD_SCHEMAS = ROOT / "helm" / "crd-schemas"
KUBE_VERSION = "1.35.0"
GPU = "nvidia.com/gpu"
GPU_SET_KEY = GPU.replace(".", "\\.")  # --set reads dots as nesting
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "LeaderWorkerSet")
STAGES = ("encoder", "denoiser", "vae")

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed: make chart-tools"
)
jsonschema = pytest.importorskip("jsonschema")


def _helm_binary() -> str | None:
    beside = Path(sys.executable).with_name("helm")
    return str(beside) if beside.exists() else shutil.which("helm")


HELM = _helm_binary()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="no helm binary: `make chart-tools` fetches one (tools/fetch_helm.py)"
)

EXAMPLES = sorted(p.name for p in (CHART / "examples").glob("*.yaml"))
# name -> helm arguments: the defaults, every example, and variants the examples do not show.
CASES: dict[str, tuple[str, ...]] = {
    "defaults": (),
    **{name: ("-f", str(CHART / "examples" / name)) for name in EXAMPLES},
    "defaults-autoscale-on": ("--set", "gateway.autoscale.mode=on"),
    "defaults-autoscale-dry-run": ("--set", "gateway.autoscale.mode=dry-run"),
    "lws-keda-servicemonitor": (
        "-f",
        str(CHART / "examples" / "multinode-lws.yaml"),
        "--set",
        "keda.enabled=true",
        "--set",
        "monitoring.serviceMonitor.enabled=true",
    ),
    "lws-autoscale-on": (
        "-f",
        str(CHART / "examples" / "multinode-lws.yaml"),
        "--set",
        "gateway.autoscale.mode=on",
    ),
}


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def helm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HELM, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def template(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return helm(env, "template", "rel", str(CHART), "--kube-version", KUBE_VERSION, *args)


@functools.cache
def _rendered(case: str, env_key: str) -> tuple[dict, ...]:
    env = json.loads(env_key)
    out = template(env, *CASES[case])
    assert out.returncode == 0, f"helm template ({case}) failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@pytest.fixture(scope="module")
def render(helm_env):
    key = json.dumps(helm_env, sort_keys=True)
    return lambda case: list(_rendered(case, key))


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs):
    """(workload, role, pod spec) of every pod template the stages run (not the helm test)."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, "server", d["spec"]["template"]["spec"]
        elif d["kind"] == "LeaderWorkerSet":
            t = d["spec"]["leaderWorkerTemplate"]
            yield d, "leader", t["leaderTemplate"]["spec"]
            yield d, "worker", t["workerTemplate"]["spec"]


def stage_of(workload) -> str:
    return workload["metadata"]["labels"]["ditmesh.io/stage"]


def flag(args, name, default=None):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


# -- lint, render, validate ------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_helm_lint_strict(helm_env, case):
    out = helm(helm_env, "lint", "--strict", str(CHART), *CASES[case])
    assert out.returncode == 0, out.stdout + out.stderr


def _crd_validator(doc):
    group, version = doc["apiVersion"].split("/")
    path = CRD_SCHEMAS / f"{doc['kind'].lower()}-{group.split('.')[0]}-{version}.json"
    assert path.exists(), f"no schema kept for {doc['kind']} {doc['apiVersion']} ({path.name})"
    schema = json.loads(path.read_text())
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("case", list(CASES))
def test_every_manifest_validates_strictly(render, case):
    docs = render(case)
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].startswith(
            ("apps/", "policy/", "networking.k8s.io/", "rbac.authorization.k8s.io/")
        ):
            errors = sorted(_crd_validator(doc).iter_errors(doc), key=str)
            assert not errors, f"{case}: {where}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
            )
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(map(str, e.path))
                pytest.fail(f"{case}: {where} fails Kubernetes {KUBE_VERSION}: {path}: {e.message}")


def test_crd_schemas_reject_unknown_fields_and_wrong_types(render):
    """The kept CRD schemas are strict: a misspelt field or a wrong type is caught."""
    (lws,) = of_kind(render("lws-keda-servicemonitor"), "LeaderWorkerSet")
    assert not list(_crd_validator(lws).iter_errors(lws))
    typo = json.loads(json.dumps(lws))
    typo["spec"]["leaderWorkerTemplate"]["sizee"] = 2
    assert list(_crd_validator(typo).iter_errors(typo))
    wrong = json.loads(json.dumps(lws))
    container = wrong["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    container["ports"][0]["containerPort"] = "grpc"
    assert list(_crd_validator(wrong).iter_errors(wrong))
    (so, *_) = of_kind(render("lws-keda-servicemonitor"), "ScaledObject")
    bad = json.loads(json.dumps(so))
    bad["spec"]["minReplicaCount"] = "one"
    assert list(_crd_validator(bad).iter_errors(bad))


def test_a_schema_violation_fails_helm_template_with_a_clear_message(helm_env):
    out = template(helm_env, "--set", "gateway.autoscale.mode=sometimes")
    assert out.returncode != 0
    assert "/gateway/autoscale/mode" in out.stderr and "one of" in out.stderr, out.stderr
    out = template(helm_env, "--set", "encoder.replicaz=2")
    assert out.returncode != 0
    assert "replicaz" in out.stderr and "not allowed" in out.stderr, out.stderr
    out = template(helm_env, "--set", "vae.parallel=0")
    assert out.returncode != 0 and "/vae/parallel" in out.stderr, out.stderr


def test_template_checks_fail_with_a_clear_message(helm_env):
    # A GPU count in resources that is not the product of the gang's degrees.
    out = template(helm_env, "--set", f"denoiser.resources.limits.{GPU_SET_KEY}=2")
    assert out.returncode != 0 and "needs 4 GPUs" in out.stderr, out.stderr
    # A gang whose GPUs do not split evenly over its nodes.
    out = template(
        helm_env,
        "--set",
        "denoiser.groups[0].name=g",
        "--set",
        "denoiser.groups[0].replicas=1",
        "--set",
        "denoiser.groups[0].nodes=3",
        "--set",
        "denoiser.groups[0].parallel.ulysses=4",
    )
    assert out.returncode != 0 and "do not split over 3 nodes" in out.stderr, out.stderr
    # Two autoscalers on the same workloads.
    out = template(helm_env, "--set", "keda.enabled=true", "--set", "gateway.autoscale.mode=on")
    assert out.returncode != 0 and "two autoscalers" in out.stderr, out.stderr
    # A required value left empty.
    out = template(helm_env, "--set", "model.pvc.claimName=")
    assert out.returncode != 0 and "model.pvc.claimName is required" in out.stderr, out.stderr


# -- RBAC -------------------------------------------------------------------------------


def _own_workloads(docs, scaled_group=None) -> dict[str, set[str]]:
    """plural -> names of the release's stage workloads the gateway scales."""
    out: dict[str, set[str]] = {}
    gateway_args = _container(docs, "gateway")["args"]
    for stage in STAGES:
        kind, name = flag(gateway_args, f"{stage}-workload").split("/")
        (obj,) = [d for d in docs if d["kind"].lower() == kind and d["metadata"]["name"] == name]
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "ditmesh"
        assert labels["ditmesh.io/stage"] == stage
        assert labels["app.kubernetes.io/instance"] == "rel"
        out.setdefault(f"{kind}s", set()).add(name)
    return out


def _container(docs, stage):
    for w, _, spec in pod_specs(docs):
        if stage_of(w) == stage:
            return spec["containers"][0]
    raise AssertionError(f"no {stage} workload")


@pytest.mark.parametrize("case", list(CASES))
def test_rbac_grants_only_scale_and_get_on_own_workloads_and_watch_on_endpointslices(render, case):
    docs = render(case)
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    (role,) = of_kind(docs, "Role")
    (binding,) = of_kind(docs, "RoleBinding")
    (sa,) = of_kind(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [sa["metadata"]["name"]]
    gateway = next(w for w, _, _ in pod_specs(docs) if stage_of(w) == "gateway")
    assert gateway["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    # No other pod gets an API token.
    for w, _, spec in pod_specs(docs):
        if stage_of(w) != "gateway":
            assert spec["automountServiceAccountToken"] is False

    mode = flag(_container(docs, "gateway")["args"], "autoscale")
    autoscaling = mode != "off"
    own = _own_workloads(docs) if autoscaling else {}
    granted: dict[str, set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "*" not in rule["apiGroups"]
        for resource in rule["resources"]:
            group = rule["apiGroups"][0]
            names = set(rule.get("resourceNames", []))
            verbs = set(rule["verbs"])
            granted.setdefault(resource, set()).update(verbs)
            if resource == "endpointslices":
                assert group == "discovery.k8s.io" and verbs == {"list", "watch"}
            elif resource in ("deployments", "statefulsets", "leaderworkersets"):
                assert verbs == {"get"} and names == own[resource], rule
            elif resource.endswith("/scale"):
                assert verbs <= {"get", "patch"} and names == own[resource.split("/")[0]], rule
            elif resource == "leases":
                assert group == "coordination.k8s.io"
                assert verbs == {"create"} and not names or names == {"rel-ditmesh-autoscaler"}
            elif resource == "events":
                assert group == "" and verbs == {"create"}
            else:
                pytest.fail(f"the gateway's Role grants {resource}: {rule}")
    assert granted["endpointslices"] == {"list", "watch"}
    if mode == "on":
        for plural in own:
            assert granted[f"{plural}/scale"] == {"get", "patch"}
        assert granted["events"] == {"create"}
    elif mode == "dry-run":  # reads, decides and logs: it patches nothing
        assert not any(r.endswith("/scale") for r in granted) and "events" not in granted
        assert {"deployments", "statefulsets", "leases"} <= set(granted)
    else:
        assert set(granted) == {"endpointslices"}


# -- probes, drain, security ------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_probes_on_every_container_and_drain_within_the_grace_period(render, case):
    docs = render(case)
    for w, role, spec in pod_specs(docs):
        where = f"{case}: {w['kind']}/{w['metadata']['name']} ({role})"
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                assert p and ("grpc" in p or "exec" in p), f"{where}: {c['name']} has no {probe}"
            start = c["startupProbe"]
            if stage_of(w) != "gateway" and case != "cpu-tiny.yaml":
                # Loading a 12B model and compiling takes minutes: 30 at least.
                assert start["failureThreshold"] * start["periodSeconds"] >= 1800, where
            drain = float(flag(c["args"], "drain-seconds"))
            stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert spec["terminationGracePeriodSeconds"] > drain + stop, where
        for c in spec.get("initContainers", []):
            assert c["args"][0] == "make-tiny", f"{where}: unexpected init container"


@pytest.mark.parametrize("case", list(CASES))
def test_pods_run_non_root_read_only_without_privilege(render, case):
    docs = render(case)
    hook_pods = [(p, "test", p["spec"]) for p in of_kind(docs, "Pod")]
    for w, role, spec in [*pod_specs(docs), *hook_pods]:
        where = f"{case}: {w['metadata']['name']} ({role})"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{where}: {c['name']} has no writable /tmp"
            for m in mounts.values():
                assert m["name"] in volumes
            model = mounts.get("/models")
            if model is not None and c["name"] != "make-tiny":
                assert model["readOnly"] is True, where
        if role in ("leader", "worker") or (w["kind"] != "Pod" and _gang_size(spec) > 1):
            shm = volumes["shm"]["emptyDir"]
            assert shm["medium"] == "Memory", f"{where}: a gang needs /dev/shm in memory"


def _gang_size(spec) -> int:
    args = spec["containers"][0]["args"]
    if args[1] == "denoiser":
        return math.prod(
            int(flag(args, d, 1)) for d in ("dp", "cfg", "pipefusion", "ulysses", "ring")
        )
    if args[1] == "vae":
        return int(flag(args, "parallel", 1))
    return 1


# -- GPUs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_requests_equal_the_degrees_product(render, case):
    docs = render(case)
    gpu_on = case != "cpu-tiny.yaml"
    for w, role, spec in pod_specs(docs):
        c = spec["containers"][0]
        stage = stage_of(w)
        limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
        if stage in ("denoiser", "vae") and gpu_on:
            nodes = w["spec"]["leaderWorkerTemplate"]["size"] if role != "server" else 1
            per_pod = _gang_size(spec) // nodes
            assert per_pod * nodes == _gang_size(spec)
            assert int(limits[GPU]) == per_pod == int(requests[GPU]), (case, w["metadata"]["name"])
            if role != "server":
                assert f"--nproc-per-node={per_pod}" in c["command"]
                assert "--nnodes=$(LWS_GROUP_SIZE)" in c["command"]
        elif not gpu_on or stage == "gateway":
            assert GPU not in limits and GPU not in requests, (case, w["metadata"]["name"])
            if stage != "gateway":
                assert "--device=cpu" in c["args"]


def test_defaults_fit_one_8_gpu_node(render):
    docs = render("defaults")
    total = 0
    gangs = []
    for w, _, spec in pod_specs(docs):
        gpus = int(spec["containers"][0]["resources"]["limits"].get(GPU, 0))
        replicas = w["spec"]["replicas"]
        total += gpus * replicas
        if stage_of(w) == "denoiser":
            gangs += [_gang_size(spec)] * replicas
        elif stage_of(w) in ("encoder", "vae"):
            assert gpus * replicas == 1
    assert sorted(gangs) == [1, 1, 4]
    assert total == 8
    args = next(
        spec["containers"][0]["args"]
        for w, _, spec in pod_specs(docs)
        if stage_of(w) == "denoiser" and _gang_size(spec) == 4
    )
    assert flag(args, "ulysses") == "4"


# -- NetworkPolicy ------------------------------------------------------------------------


def _matches(selector, labels) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _allows(policy, src_labels, src_namespace_labels, port) -> bool:
    """Whether a NetworkPolicy lets a pod (its labels, its namespace's) reach `port`."""
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
            ns_ok = (
                _matches(ns_sel, src_namespace_labels)
                if ns_sel is not None
                else (src_namespace_labels.get("kubernetes.io/metadata.name") == "release-ns")
            )
            pod_ok = _matches(pod_sel, src_labels) if pod_sel is not None else True
            if ns_ok and pod_ok:
                return True
    return False


@pytest.mark.parametrize("case", list(CASES))
def test_networkpolicy_blocks_stage_to_stage_traffic(render, case):
    docs = render(case)
    policies = of_kind(docs, "NetworkPolicy")
    same_ns = {"kubernetes.io/metadata.name": "release-ns"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    pods = [
        (stage_of(w), role, w, {**w["spec"]["template"]["metadata"]["labels"]})
        if w["kind"] != "LeaderWorkerSet"
        else (stage_of(w), role, w, _lws_pod_labels(w, role))
        for w, role, _ in pod_specs(docs)
    ]

    lws_pairs: list[bool] = []

    def reach(src_labels, ns, dst_labels, port) -> bool:
        selecting = [p for p in policies if _matches(p["spec"]["podSelector"], dst_labels)]
        assert selecting, f"no NetworkPolicy selects {dst_labels}"
        return any(_allows(p, src_labels, ns, port) for p in selecting)

    for i, (dst_stage, _, dst, dst_labels) in enumerate(pods):
        for j, (src_stage, _, src, src_labels) in enumerate(pods):
            if src_stage == "gateway" and dst_stage != "gateway":
                assert reach(src_labels, same_ns, dst_labels, "grpc")
            elif src_stage != dst_stage and dst_stage != "gateway":
                for port in ("grpc", "metrics", "rendezvous", 12345):
                    assert not reach(src_labels, same_ns, dst_labels, port), (
                        f"{case}: {src_stage} reaches {dst_stage}:{port}"
                    )
            elif i != j and src_stage == dst_stage and dst_stage != "gateway":
                # Only the pods of one multi-node gang talk to each other (rendezvous, NCCL).
                same_gang = src["kind"] == "LeaderWorkerSet" and src is dst
                for port in ("grpc", "rendezvous", 12345):
                    assert reach(src_labels, same_ns, dst_labels, port) == same_gang, (
                        f"{case}: {src['metadata']['name']} -> {dst['metadata']['name']}:{port}"
                    )
                lws_pairs.append(same_gang)
        assert reach({}, monitoring, dst_labels, "metrics")
        assert not reach({}, monitoring, dst_labels, "grpc") or dst_stage == "gateway"
        stranger = {"app": "something-else"}
        assert reach(stranger, same_ns, dst_labels, "grpc") == (
            dst_stage == "gateway" and (case != "autoscaled-production.yaml")
        ), f"{case}: a stranger and {dst_stage}"
    # Cases with a multi-node gang did check that its own pods reach each other.
    assert any(lws_pairs) == bool(of_kind(docs, "LeaderWorkerSet"))


def _lws_pod_labels(w, role):
    t = w["spec"]["leaderWorkerTemplate"][
        "leaderTemplate" if role == "leader" else "workerTemplate"
    ]
    # The LeaderWorkerSet controller adds its own labels to every pod of a set.
    return {**t["metadata"]["labels"], "leaderworkerset.sigs.k8s.io/name": w["metadata"]["name"]}


# -- what the services are started with ---------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_serve_arguments_parse_with_the_cli(render, case):
    from ditmesh.cli import build_parser

    parser = build_parser()
    knows_tls = any("--tls-cert" in a.option_strings for a in _serve_parser(parser)._actions)
    tls_cases: list[str] = []
    for w, _, spec in pod_specs(render(case)):
        c = spec["containers"][0]
        assert c["command"][0] in ("ditmesh", "torchrun")
        if c["command"][0] == "torchrun":
            assert c["command"][-2:] == ["-m", "ditmesh.cli"]
        args = list(c["args"])
        if not knows_tls:  # the --tls-* flags arrive with TLS support (issue 16's TLS part)
            args = [a for a in args if not a.startswith("--tls-")]
        ns = parser.parse_args(args)
        assert ns.command == "serve" and ns.stage == stage_of(w)
        assert ns.host == "0.0.0.0" and ns.port > 0 and ns.metrics_port > 0
        port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert port_names["grpc"] == ns.port and port_names["metrics"] == ns.metrics_port
        if "--tls-cert=/etc/ditmesh/tls/tls.crt" in c["args"]:
            tls_cases.append(case)
            assert ns.tls_key and ns.tls_ca, "mutual TLS: key and CA with the certificate"
            if ns.stage == "gateway":
                assert ns.stage_tls_ca and ns.stage_tls_cert and ns.stage_tls_key
                assert ns.stage_tls_server_name == "rel-ditmesh-mesh"
    assert bool(tls_cases) == (case == "autoscaled-production.yaml")


def _serve_parser(parser):
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["serve"]


@pytest.mark.parametrize("case", list(CASES))
def test_gateway_finds_its_stages_through_their_services(render, case):
    docs = render(case)
    args = _container(docs, "gateway")["args"]
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for stage in STAGES:
        name, port = flag(args, f"{stage}-service").split(":")
        svc = services[name]
        assert port in {p["name"] for p in svc["spec"]["ports"]}
        # It selects the pods that serve gRPC: a multi-node gang's leader, not its workers.
        for w, role, _ in pod_specs(docs):
            labels = (
                _lws_pod_labels(w, role)
                if w["kind"] == "LeaderWorkerSet"
                else w["spec"]["template"]["metadata"]["labels"]
            )
            selected = _matches({"matchLabels": svc["spec"]["selector"]}, labels)
            assert selected == (stage_of(w) == stage and role in ("server", "leader"))


def test_helm_test_hook_checks_health_and_generates_one_image(render):
    (pod,) = of_kind(render("defaults"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "HealthStub" in script and "ditmesh generate" in script
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["GATEWAY"] == "rel-ditmesh-gateway:50051"


def test_keda_scales_the_same_workloads_the_gateway_would(render):
    docs = render("lws-keda-servicemonitor")
    objs = of_kind(docs, "ScaledObject")
    assert {o["metadata"]["name"] for o in objs} == {f"rel-ditmesh-{s}" for s in STAGES}
    for o in objs:
        ref = o["spec"]["scaleTargetRef"]
        (target,) = [
            d for d in docs if d["kind"] == ref["kind"] and d["metadata"]["name"] == ref["name"]
        ]
        stage = o["metadata"]["labels"]["ditmesh.io/stage"]
        assert target["metadata"]["labels"]["ditmesh.io/stage"] == stage
        assert (
            "ditmesh_gateway_queued_work_seconds" in o["spec"]["triggers"][0]["metadata"]["query"]
        )
    assert flag(_container(docs, "gateway")["args"], "autoscale") == "off"
    (sm,) = of_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
