"""deploy/k8s: every manifest against the Kubernetes schemas, then the wiring."""

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# Oldest supported upstream minor we target, and the newest the validator ships.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def docs() -> list[dict]:
    return [d for p in MANIFESTS for d in load(p)]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_manifests_exist():
    kinds = {d["kind"] for d in docs()}
    for kind in ["Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "StatefulSet"]:
        assert kind in kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_kubernetes_schema(path, version):
    resources = load(path)
    assert resources, f"{path.name} has no resources"
    for res in resources:
        # strict: unknown fields (typos) are errors too.
        kubernetes_validate.validate(res, version, strict=True)


def test_validator_rejects_a_broken_manifest():
    """The schema check has teeth: a misspelt field and a wrong type fail."""
    dep = one("Deployment", "switchboard")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in MANIFESTS)


def container(dep: dict) -> dict:
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "switchboard"]
    return c


def test_deployment_probes_replicas_resources():
    dep = one("Deployment", "switchboard")
    assert dep["spec"]["replicas"] == 3
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8080
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8080)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    # Rolling updates never drop below the desired count.
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_env_comes_from_configmap_and_listens_on_container_port():
    dep = one("Deployment", "switchboard")
    c = container(dep)
    refs = [e["configMapRef"]["name"] for e in c["envFrom"] if "configMapRef" in e]
    assert refs == ["switchboard-config"]
    cm = one("ConfigMap", "switchboard-config")
    data = cm["data"]
    assert data["SWITCHBOARD_LISTEN"] == "0.0.0.0:8080"
    assert all(isinstance(v, str) for v in data.values())
    assert int(data["SWITCHBOARD_DRAIN_SECS"]) > 0


def test_grace_period_covers_the_drain():
    dep = one("Deployment", "switchboard")
    data = one("ConfigMap", "switchboard-config")["data"]
    drain = int(data["SWITCHBOARD_DRAIN_SECS"])
    shutdown = int(data.get("SWITCHBOARD_SHUTDOWN_GRACE_SECS", "10"))
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # DRAIN_SECS of service after /readyz turns 503, then 1012 closes spread
    # over another DRAIN_SECS, then up to SHUTDOWN_GRACE_SECS for the last sockets.
    assert grace >= 2 * drain + shutdown, (grace, drain, shutdown)


def test_pod_runs_as_the_image_user():
    dep = one("Deployment", "switchboard")
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\d+)", dockerfile, re.M)
    assert sc["runAsUser"] == int(user)
    assert container(dep)["securityContext"]["readOnlyRootFilesystem"] is True


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_pdb_hpa_point_at_the_deployment():
    dep = one("Deployment", "switchboard")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels)

    svc = one("Service", "switchboard")
    assert selects(svc["spec"]["selector"], pod_labels)
    assert "sessionAffinity" not in svc["spec"] or svc["spec"]["sessionAffinity"] == "None"
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in ("http", 8080)

    pdb = one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 2

    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "switchboard")
    assert hpa["spec"]["minReplicas"] == dep["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # Utilization targets need requests on the container.
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Resource":
            assert m["resource"]["name"] in container(dep)["resources"]["requests"]

    ing = one("Ingress", "switchboard")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "switchboard"
    assert backend["port"]["name"] == port["name"]


def test_redis_statefulset_is_reachable_at_the_configured_url():
    sts = one("StatefulSet", "redis")
    gov = one("Service", sts["spec"]["serviceName"])
    assert gov["spec"]["clusterIP"] == "None", "StatefulSet needs a headless governing Service"
    assert selects(gov["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    url = one("ConfigMap", "switchboard-config")["data"]["SWITCHBOARD_REDIS_URL"]
    m = re.fullmatch(r"redis://([^:/]+):(\d+)", url)
    assert m, url
    assert m.group(1) == gov["metadata"]["name"]
    assert int(m.group(2)) == gov["spec"]["ports"][0]["port"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    limit = args[args.index("--client-output-buffer-limit") + 1]
    assert limit.startswith("pubsub ")
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])


def test_networkpolicy_lets_switchboard_reach_redis():
    np = one("NetworkPolicy")
    sts = one("StatefulSet", "redis")
    assert selects(np["spec"]["podSelector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"])
    dep = one("Deployment", "switchboard")
    (rule,) = np["spec"]["ingress"]
    assert any(selects(f["podSelector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
               for f in rule["from"])


# --- deploy/k8s-overlays/managed-cluster ---------------------------------------

OVERLAY = REPO / "deploy" / "k8s-overlays" / "managed-cluster"


def merge(base, patch):
    """Strategic merge as far as the overlay's patches use it: maps merge key
    by key (null deletes), lists of objects merge by `name` (`mountPath` for
    volume mounts), anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) for x in base + patch):
        key = "name" if all("name" in x for x in base + patch) else "mountPath"
        out = list(base)
        for item in patch:
            i = next((i for i, x in enumerate(out) if x.get(key) == item[key]), None)
            if i is None:
                out.append(item)
            else:
                out[i] = merge(out[i], item)
        return out
    return patch


def render_overlay() -> list[dict]:
    kust = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../../k8s"]
    base_kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = [d for name in base_kust["resources"] for d in load(K8S / name)]
    for entry in kust["patches"]:
        patch = yaml.safe_load((OVERLAY / entry["path"]).read_text() if "path" in entry else entry["patch"])
        ident = (patch["kind"], patch["metadata"]["name"])
        (i,) = [i for i, d in enumerate(resources) if (d["kind"], d["metadata"]["name"]) == ident]
        if patch.get("$patch") == "delete":
            del resources[i]
        else:
            resources[i] = merge(resources[i], patch)
    return resources


def kubectl_render() -> list[dict] | None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    out = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def renders() -> list[tuple[str, list[dict]]]:
    """The overlay as this file's strategic merge renders it, and as
    kustomize (`kubectl kustomize`) does where kubectl is installed."""
    found = [("python", render_overlay())]
    if (real := kubectl_render()) is not None:
        found.append(("kubectl", real))
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_managed_cluster_overlay_matches_kubernetes_schema(version):
    for _, resources in renders():
        for res in resources:
            kubernetes_validate.validate(res, version, strict=True)


def test_managed_cluster_overlay_wiring():
    for how, resources in renders():
        by = {(d["kind"], d["metadata"]["name"]): d for d in resources}
        # No in-cluster Redis, nor the policy that guarded it; the rest of the base stays.
        assert ("StatefulSet", "redis") not in by and ("Service", "redis") not in by, how
        assert not [d for d in resources if d["kind"] == "NetworkPolicy"], how
        base = {(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in load(p)}
        assert set(by) == base - {("StatefulSet", "redis"), ("Service", "redis"),
                                  ("NetworkPolicy", "redis-from-switchboard")}, how

        data = by[("ConfigMap", "switchboard-config")]["data"]
        assert data["SWITCHBOARD_REDIS_MODE"] == "cluster", how
        # The URL holds the password: only the Secret gives it.
        assert "SWITCHBOARD_REDIS_URL" not in data, how
        c = container(by[("Deployment", "switchboard")])
        (url,) = [e for e in c["env"] if e["name"] == "SWITCHBOARD_REDIS_URL"]
        ref = url["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("switchboard-redis", "url") and not ref.get("optional"), how
        # The CA file is where the ConfigMap switchboard-redis-ca is mounted.
        ca = Path(data["SWITCHBOARD_REDIS_CA_FILE"])
        (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == ca.parent]
        assert mount["readOnly"] is True, how
        spec = by[("Deployment", "switchboard")]["spec"]["template"]["spec"]
        (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert vol["configMap"]["name"] == "switchboard-redis-ca" and not vol["configMap"].get("optional"), how
        assert [i["path"] for i in vol["configMap"]["items"]] == [ca.name], how
        # The base's probes, envFrom and drain are untouched.
        assert c["envFrom"] == container(one("Deployment", "switchboard"))["envFrom"], how
        assert c["readinessProbe"] == container(one("Deployment", "switchboard"))["readinessProbe"], how


def test_overlay_merge_agrees_with_kustomize():
    real = kubectl_render()
    if real is None:
        pytest.skip("kubectl is not installed: the overlay was checked with this file's merge only")
    ours = render_overlay()
    pick = lambda rs, kind: next(d for d in rs if d["kind"] == kind)  # noqa: E731
    assert pick(real, "ConfigMap")["data"] == pick(ours, "ConfigMap")["data"]
    real_spec, our_spec = (pick(rs, "Deployment")["spec"]["template"]["spec"] for rs in (real, ours))
    assert real_spec["volumes"] == our_spec["volumes"]
    assert container({"spec": {"template": {"spec": real_spec}}}) == container({"spec": {"template": {"spec": our_spec}}})
