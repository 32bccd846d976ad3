"""Validates deploy/kubernetes/ (run by tests/deploy_manifests.rs, deploy_k8s_manifests_validate).

1. Every object against its schema: core kinds with kubernetes_validate (strict: unknown fields
   fail) for each Kubernetes version given; InferencePool and HTTPRoute, which it does not know,
   with jsonschema against the hand-written schemas in tests/fixtures/k8s-schemas/.
2. The objects agree with each other and with InferFlux: selectors match the pod labels, ports
   resolve to the container port, probes and the preStop hook call the right paths, secrets and
   config maps exist with the keys used, the endpoint picker's metric names are InferFlux gauges
   in docs/AdminGuide.md's metrics table.
3. Writes a JSON summary (--summary) of what the Rust test then checks against a live server:
   the pod's config file text, its environment from the Secret, probe and drain paths, the
   endpoint picker's metric names.

Exits 1 with one line per problem; prints one line per check passed.
"""

import argparse
import json
import pathlib
import re
import shlex
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml

# CRD kinds checked with our own schemas: (apiVersion, kind) -> file under --schemas.
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-inference.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.json",
}
# Seconds actix-web waits for open connections after SIGTERM (its default shutdown timeout).
ACTIX_SHUTDOWN_S = 30
MODEL_SERVER = "inferflux"
EPP = "inferflux-epp"

problems = []


def fail(msg):
    problems.append(msg)


def ok(msg):
    print(f"ok  {msg}")


def load_objects(root):
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    if kust.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or kust.get("kind") != "Kustomization":
        fail("kustomization.yaml: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    listed = kust.get("resources", [])
    on_disk = sorted(p.name for p in root.glob("*.yaml") if p.name != "kustomization.yaml")
    if sorted(listed) != on_disk:
        fail(f"kustomization.yaml resources {sorted(listed)} != the manifests on disk {on_disk}")
    else:
        ok(f"kustomization.yaml lists every manifest ({len(listed)})")
    objects = []
    for name in listed:
        path = root / name
        if not path.exists():
            fail(f"kustomization.yaml names {name}, which does not exist")
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append((name, doc))
    return objects


def validate_schemas(objects, schemas_dir, versions):
    for file, obj in objects:
        where = f"{file}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_SCHEMAS:
            schema = json.loads((schemas_dir / CRD_SCHEMAS[key]).read_text())
            validator = jsonschema.Draft202012Validator(schema)
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            for e in errors:
                fail(f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
            if not errors:
                ok(f"{where} matches {CRD_SCHEMAS[key]}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{where} (Kubernetes {version}): {'/'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{where}: {e.message}")
            else:
                ok(f"{where} valid for Kubernetes {version} (strict)")


def find(objects, kind, name):
    hits = [o for _, o in objects if o.get("kind") == kind and o["metadata"]["name"] == name]
    if len(hits) != 1:
        fail(f"expected exactly one {kind} named {name}, found {len(hits)}")
        return None
    return hits[0]


def selects(selector, labels, what):
    """True when every selector entry is among the pod labels."""
    missing = {k: v for k, v in selector.items() if labels.get(k) != v}
    if missing or not selector:
        fail(f"{what}: selector {selector} does not match the pod labels {labels}")
        return False
    ok(f"{what} selects the pods ({selector})")
    return True


def resolve_port(port, container):
    """A probe or targetPort (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    fail(f"port name {port!r} is not a port of container {container['name']}")
    return None


def flag(args, name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def secret_value(objects, ref, what):
    secret = find(objects, "Secret", ref["name"])
    if secret is None:
        return None
    data = secret.get("stringData", {})
    if ref["key"] not in data:
        fail(f"{what}: Secret {ref['name']} has no key {ref['key']} in stringData")
        return None
    return data[ref["key"]]


def mounted_file(objects, pod_spec, container, path, what):
    """The ConfigMap text behind `path` in the container, via its volume mount."""
    for m in container.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        key = path[len(prefix):]
        vol = next((v for v in pod_spec.get("volumes", []) if v["name"] == m["name"]), None)
        if vol is None or "configMap" not in vol:
            fail(f"{what}: volume {m['name']} is not a ConfigMap")
            return None
        cm = find(objects, "ConfigMap", vol["configMap"]["name"])
        if cm is None:
            return None
        if key not in cm.get("data", {}):
            fail(f"{what}: ConfigMap {cm['metadata']['name']} has no key {key}")
            return None
        ok(f"{what}: {path} is ConfigMap {cm['metadata']['name']} key {key}")
        return cm["data"][key]
    fail(f"{what}: {path} is under no volume mount of container {container['name']}")
    return None


def documented_gauges(admin_guide):
    """Metric names the AdminGuide's metrics table lists as gauges."""
    gauges = set()
    for line in admin_guide.splitlines():
        m = re.match(r"^\| `(inferflux_[a-z_]+)`[^|]*\| (gauge)", line)
        if m:
            gauges.add(m.group(1))
    return gauges


def check_model_server(objects, summary):
    dep = find(objects, "Deployment", MODEL_SERVER)
    if dep is None:
        return None
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    selects(dep["spec"]["selector"]["matchLabels"], labels, f"Deployment {MODEL_SERVER}")
    container = spec["containers"][0]
    args = container.get("args", [])
    port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == "http"), None)
    if port is None:
        fail("the model server container has no port named http")
        return None

    config_path = flag(args, "--config")
    config_text = mounted_file(objects, spec, container, config_path, "--config") if config_path else None
    if config_text is None:
        fail("the model server has no --config from a ConfigMap")
        config_text = ""
    config = tomllib.loads(config_text)
    served_port = int(flag(args, "--port") or config.get("server", {}).get("port", 8080))
    if served_port != port:
        fail(f"the server listens on {served_port}, the container port is {port}")
    else:
        ok(f"the server listens on the container port {port}")
    host = flag(args, "--host") or config.get("server", {}).get("host", "127.0.0.1")
    if host != "0.0.0.0":
        fail(f"the server binds {host}: probes and the gateway cannot reach it")
    model = flag(args, "--model")
    if not model or not any(model.startswith(m["mountPath"].rstrip("/") + "/") for m in container.get("volumeMounts", [])):
        fail(f"--model {model} is not under a mounted volume")
    else:
        ok(f"--model {model} is on a mounted volume")
    for vol in spec.get("volumes", []):
        if "persistentVolumeClaim" in vol:
            find(objects, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])

    env = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            value = secret_value(objects, ref, f"env {e['name']}")
            if value is not None:
                env[e["name"]] = value
        elif "value" in e:
            env[e["name"]] = e["value"]
    if "INFERFLUX__AUTH__ADMIN_TOKEN" not in env:
        fail("the admin token does not reach the server as INFERFLUX__AUTH__ADMIN_TOKEN from a Secret")
    else:
        ok("INFERFLUX__AUTH__ADMIN_TOKEN comes from the Secret")

    probes = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if probe is None:
            fail(f"the model server has no {kind}")
            continue
        get = probe["httpGet"]
        if resolve_port(get["port"], container) != port:
            fail(f"{kind} port {get['port']} is not the container port {port}")
        probes[kind] = get["path"]
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    if probes != expected:
        fail(f"probe paths {probes} != {expected}")
    else:
        ok(f"probes: {probes}")

    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    drain = parse_drain(pre_stop, port)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if drain:
        if drain["sleep_s"] + ACTIX_SHUTDOWN_S > grace:
            fail(f"preStop sleeps {drain['sleep_s']} s: with actix's {ACTIX_SHUTDOWN_S} s shutdown wait that "
                 f"exceeds terminationGracePeriodSeconds {grace}")
        else:
            ok(f"preStop ({drain['sleep_s']} s) + shutdown wait ({ACTIX_SHUTDOWN_S} s) fit the grace period {grace} s")
        token_var = drain["token_var"]
        if token_var not in [e["name"] for e in container.get("env", [])]:
            fail(f"preStop reads the token from ${token_var}, which the container does not set")

    gpu = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if str(gpu) != "1" or str(container["resources"].get("requests", {}).get("nvidia.com/gpu")) != "1":
        fail("the model server must request and limit exactly one nvidia.com/gpu")
    else:
        ok("one nvidia.com/gpu requested")

    svc = find(objects, "Service", MODEL_SERVER)
    if svc is not None:
        selects(svc["spec"]["selector"], labels, f"Service {MODEL_SERVER}")
        for p in svc["spec"]["ports"]:
            if resolve_port(p["targetPort"], container) != port:
                fail(f"Service port {p['name']} targets {p['targetPort']}, not the container port {port}")
            else:
                ok(f"Service port {p['name']} targets the container port {port}")

    summary.update(
        config_toml=config_text,
        env=env,
        probes=probes,
        drain=drain,
        container_port=port,
    )
    return labels, port


def parse_drain(command, port):
    """The preStop hook: `inferctl --url URL admin drain` (or `curl -X POST URL/admin/drain`),
    with the token from the environment, then `sleep N`."""
    script = command[-1] if command[:2] == ["/bin/sh", "-c"] else None
    if script is None:
        fail(f"preStop is not a /bin/sh -c script: {command}")
        return None
    words = shlex.split(script.replace(";", " ; "))
    drain = {}
    if "inferctl" in words:
        rest = words[words.index("inferctl"):]
        url = flag(rest, "--url")
        if not ("admin" in rest and rest[rest.index("admin") + 1] == "drain"):
            fail(f"preStop runs inferctl without `admin drain`: {script}")
            return None
        # inferctl admin drain posts {"drain": true} to /admin/drain (src/bin/inferctl/admin.rs).
        drain.update(method="POST", path="/admin/drain", url=url)
        m = re.search(r'INFERFLUX_ADMIN_TOKEN="\$([A-Z_]+)"', script)
        drain["token_var"] = m.group(1) if m else None
    elif "curl" in words:
        m = re.search(r"(http://[^\s\"']+)(/admin/drain)", script)
        if not m or "POST" not in words:
            fail(f"preStop curl does not POST /admin/drain: {script}")
            return None
        drain.update(method="POST", path=m.group(2), url=m.group(1))
        t = re.search(r"Bearer \$\{?([A-Z_]+)", script)
        drain["token_var"] = t.group(1) if t else None
    else:
        fail(f"preStop neither runs inferctl nor curl: {script}")
        return None
    if drain["path"] != "/admin/drain":
        fail(f"preStop calls {drain['path']}, not /admin/drain")
    if not drain["url"] or not re.fullmatch(rf"http://(127\.0\.0\.1|localhost):{port}", drain["url"]):
        fail(f"preStop calls {drain['url']}, not the server on port {port} of its own pod")
    if not drain["token_var"]:
        fail("preStop sends no admin token")
    sleeps = [int(words[i + 1]) for i, w in enumerate(words[:-1]) if w == "sleep"]
    if len(sleeps) != 1 or ";" not in words or words.index("sleep") < words.index(";"):
        fail(f"preStop must drain first, then sleep once so that in-flight requests finish: {script}")
        return None
    drain["sleep_s"] = sleeps[0]
    ok(f"preStop: POST {drain['path']} on {drain['url']} with ${drain['token_var']}, then sleep {sleeps[0]} s")
    return drain


def check_gateway(objects, pod_labels, port, gauges, summary):
    pool = find(objects, "InferencePool", MODEL_SERVER)
    if pool is None:
        return
    spec = pool["spec"]
    selects(spec["selector"]["matchLabels"], pod_labels, f"InferencePool {MODEL_SERVER}")
    numbers = [p["number"] for p in spec["targetPorts"]]
    if len(set(numbers)) != len(numbers):
        fail(f"InferencePool target ports are not unique: {numbers}")
    if numbers != [port]:
        fail(f"InferencePool targetPorts {numbers} != the container port [{port}]")
    else:
        ok(f"InferencePool targets the container port {port}")
    ref = spec["endpointPickerRef"]
    if ref.get("kind", "Service") == "Service" and "port" not in ref:
        fail("endpointPickerRef to a Service needs a port")

    epp_svc = find(objects, "Service", ref["name"])
    epp = find(objects, "Deployment", EPP)
    if epp_svc is None or epp is None:
        return
    if ref["port"]["number"] not in [p["port"] for p in epp_svc["spec"]["ports"]]:
        fail(f"endpointPickerRef port {ref['port']['number']} is not a port of Service {ref['name']}")
    epp_pod = epp["spec"]["template"]
    epp_spec = epp_pod["spec"]
    selects(epp["spec"]["selector"]["matchLabels"], epp_pod["metadata"]["labels"], f"Deployment {EPP}")
    selects(epp_svc["spec"]["selector"], epp_pod["metadata"]["labels"], f"Service {ref['name']}")
    container = epp_spec["containers"][0]
    for p in epp_svc["spec"]["ports"]:
        resolve_port(p["targetPort"], container)
    args = container["args"]
    if flag(args, "--pool-name") != pool["metadata"]["name"]:
        fail(f"EPP --pool-name {flag(args, '--pool-name')} is not the InferencePool {pool['metadata']['name']}")
    if flag(args, "--pool-group") != "inference.networking.k8s.io":
        fail("EPP --pool-group must be inference.networking.k8s.io (the v1 InferencePool)")
    for legacy in ("--total-queued-requests-metric", "--kv-cache-usage-percentage-metric", "--lora-info-metric",
                   "--total-running-requests-metric", "--cache-info-metric"):
        if any(a == legacy or a.startswith(legacy + "=") for a in args):
            fail(f"EPP {legacy} is refused at start since v1.4: set the metric in engineConfigs")
    image = container["image"]
    if not image.startswith("registry.k8s.io/gateway-api-inference-extension/epp:v1."):
        fail(f"EPP image {image} is not a v1 release")
    sa = epp_spec.get("serviceAccountName")
    find(objects, "ServiceAccount", sa)
    binding = find(objects, "RoleBinding", EPP)
    role = find(objects, "Role", EPP)
    if binding and role:
        if binding["roleRef"]["name"] != role["metadata"]["name"] or sa not in [s["name"] for s in binding["subjects"]]:
            fail("the RoleBinding does not bind the EPP's ServiceAccount to its Role")
        granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                   if {"get", "list", "watch"} <= set(rule["verbs"])}
        for need in [("", "pods"), ("inference.networking.k8s.io", "inferencepools")]:
            if need not in granted:
                fail(f"the EPP Role does not grant get/list/watch on {need}")
        ok("EPP RBAC: pods and inferencepools readable")

    text = mounted_file(objects, epp_spec, container, flag(args, "--config-file"), "EPP --config-file")
    if text is None:
        return
    cfg = yaml.safe_load(text)
    if cfg.get("apiVersion") != "inference.networking.x-k8s.io/v1alpha1" or cfg.get("kind") != "EndpointPickerConfig":
        fail("the EPP config is not an inference.networking.x-k8s.io/v1alpha1 EndpointPickerConfig")
    plugins = {p.get("name", p["type"]): p for p in cfg["plugins"]}
    refs = [p["pluginRef"] for prof in cfg["schedulingProfiles"] for p in prof["plugins"]]
    for src in cfg.get("dataLayer", {}).get("sources", []):
        refs.append(src["pluginRef"])
        refs += [e["pluginRef"] for e in src["extractors"]]
    for r in refs:
        if r not in plugins:
            fail(f"EPP config refers to plugin {r!r}, which is not declared")
    extractor = next((p for p in cfg["plugins"] if p["type"] == "core-metrics-extractor"), None)
    if extractor is None:
        fail("the EPP config has no core-metrics-extractor")
        return
    params = extractor["parameters"]
    engines = {e["name"]: e for e in params["engineConfigs"]}
    label_key = params.get("engineLabelKey", "inference.networking.k8s.io/engine-type")
    engine = pod_labels.get(label_key, params.get("defaultEngine", "vllm"))
    if engine not in engines or params.get("defaultEngine") != engine:
        fail(f"pods are engine {engine!r} (label {label_key}); engineConfigs has {sorted(engines)}, "
             f"defaultEngine {params.get('defaultEngine')!r}")
        return
    ok(f"pods labelled {label_key}={engine}, which engineConfigs defines")
    specs = engines[engine]
    metrics = {}
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        name = re.sub(r"\{.*\}$", "", specs.get(field, ""))
        if name not in gauges:
            fail(f"EPP {field} {name!r} is not a gauge in docs/AdminGuide.md's metrics table")
        metrics[field] = name
    for field in ("loraSpec", "cacheInfoSpec"):
        if specs.get(field, None) != "":
            fail(f"EPP {field} must be \"\" (InferFlux exports no such metric), not {specs.get(field)!r}")
    ok(f"EPP reads InferFlux gauges {metrics}")
    summary["epp_metrics"] = metrics

    route = find(objects, "HTTPRoute", MODEL_SERVER)
    if route is None:
        return
    backends = [b for r in route["spec"]["rules"] for b in r.get("backendRefs", [])]
    paths = [m["path"] for r in route["spec"]["rules"] for m in r.get("matches", [])]
    if not any(b.get("group") == "inference.networking.k8s.io" and b.get("kind") == "InferencePool"
               and b["name"] == pool["metadata"]["name"] for b in backends):
        fail(f"HTTPRoute {MODEL_SERVER} does not send to InferencePool {pool['metadata']['name']}")
    elif {"type": "PathPrefix", "value": "/v1"} not in paths:
        fail(f"HTTPRoute {MODEL_SERVER} does not match the /v1 prefix: {paths}")
    else:
        ok("HTTPRoute sends /v1 to the InferencePool")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifests", type=pathlib.Path, required=True)
    ap.add_argument("--schemas", type=pathlib.Path, required=True)
    ap.add_argument("--admin-guide", type=pathlib.Path, required=True)
    ap.add_argument("--k8s-version", action="append", required=True)
    ap.add_argument("--summary", type=pathlib.Path, required=True)
    a = ap.parse_args()

    objects = load_objects(a.manifests)
    validate_schemas(objects, a.schemas, a.k8s_version)
    summary = {}
    server = check_model_server(objects, summary)
    if server:
        check_gateway(objects, *server, documented_gauges(a.admin_guide.read_text()), summary)
    a.summary.write_text(json.dumps(summary, indent=2))
    if problems:
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
