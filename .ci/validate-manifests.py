"""Validates Kubernetes manifests (multi-document YAML files, e.g. `kubectl kustomize` output).

Every document is checked against the Kubernetes JSON schemas of each version given with
--kubernetes-version, in strict mode (unknown fields are errors), with the kubernetes-validate
package. Kinds that the core schemas do not know fail, except the custom resources listed in
CUSTOM_CHECKS, which get a structural check of their own. With --cross-references, the documents
of each file must also fit together: selectors select the Deployment's pods, named ports exist,
the autoscaler targets a Deployment of the file, mounted ConfigMaps and claims are defined.

Usage: validate-manifests.py [--cross-references] --kubernetes-version 1.30.0 [...] FILE...
Exit status: 0 when everything is valid, 1 otherwise.
"""

import argparse
import re
import sys

import kubernetes_validate
import yaml

DURATION = re.compile(r"^(0|([0-9]+(ms|s|m|h))+)$")


def fail(errors, where, message):
    errors.append(f"{where}: {message}")


def check_service_monitor(doc, where, errors):
    """monitoring.coreos.com/v1 ServiceMonitor: the fields the Prometheus Operator requires, and
    no unknown ones among those this project uses (a typo would otherwise scrape nothing)."""
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(errors, where, f"apiVersion {doc.get('apiVersion')!r}, expected monitoring.coreos.com/v1")
    allowed_top = {"apiVersion", "kind", "metadata", "spec"}
    for key in set(doc) - allowed_top:
        fail(errors, where, f"unknown top-level field {key!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        fail(errors, where, "spec is missing")
        return
    allowed_spec = {
        "selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
        "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
        "attachMetadata", "scrapeProtocols", "fallbackScrapeProtocol", "scrapeClass",
        "bodySizeLimit", "keepDroppedTargets", "serviceDiscoveryRole",
    }
    for key in set(spec) - allowed_spec:
        fail(errors, where, f"unknown field spec.{key}")
    labels = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(labels, dict) or not labels:
        fail(errors, where, "spec.selector.matchLabels must be a non-empty map")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        fail(errors, where, "spec.endpoints must be a non-empty list")
        return
    allowed_endpoint = {
        "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "honorLabels",
        "honorTimestamps", "trackTimestampsStaleness", "relabelings", "metricRelabelings",
        "tlsConfig", "authorization", "basicAuth", "oauth2", "bearerTokenSecret", "followRedirects",
        "enableHttp2", "filterRunning", "proxyUrl", "noProxy", "proxyFromEnvironment",
        "proxyConnectHeader",
    }
    for i, endpoint in enumerate(endpoints):
        at = f"spec.endpoints[{i}]"
        if not isinstance(endpoint, dict):
            fail(errors, where, f"{at} must be a map")
            continue
        for key in set(endpoint) - allowed_endpoint:
            fail(errors, where, f"unknown field {at}.{key}")
        if not isinstance(endpoint.get("port"), str) and "targetPort" not in endpoint:
            fail(errors, where, f"{at} needs `port` (a Service port name) or `targetPort`")
        path = endpoint.get("path", "/metrics")
        if not isinstance(path, str) or not path.startswith("/"):
            fail(errors, where, f"{at}.path must be an absolute path")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not DURATION.match(str(endpoint[key])):
                fail(errors, where, f"{at}.{key} {endpoint[key]!r} is not a Prometheus duration")


CUSTOM_CHECKS = {"ServiceMonitor": check_service_monitor}


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_template(doc):
    return (doc.get("spec") or {}).get("template") or {}


def cross_references(docs, where, errors):
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    deployments = by_kind.get("Deployment", {})
    services = by_kind.get("Service", {})
    pod_labels = {
        name: (pod_template(d).get("metadata") or {}).get("labels") or {} for name, d in deployments.items()
    }
    container_ports = {
        name: {p.get("name") for c in pod_template(d)["spec"]["containers"] for p in c.get("ports", [])}
        for name, d in deployments.items()
    }

    for name, d in deployments.items():
        if not selects(d["spec"]["selector"].get("matchLabels"), pod_labels[name]):
            fail(errors, where, f"Deployment/{name}: spec.selector does not select its own pod template")
        spec = pod_template(d)["spec"]
        for volume in spec.get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                fail(errors, where, f"Deployment/{name}: volume {volume['name']} mounts an undefined ConfigMap")
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
                fail(errors, where, f"Deployment/{name}: volume {volume['name']} uses an undefined claim {claim}")
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        for missing in mounts - {v["name"] for v in spec.get("volumes", [])}:
            fail(errors, where, f"Deployment/{name}: volumeMount {missing} has no volume")

    for name, s in services.items():
        targets = [d for d, labels in pod_labels.items() if selects(s["spec"].get("selector"), labels)]
        if not targets:
            fail(errors, where, f"Service/{name}: its selector matches no Deployment's pods")
        for port in s["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str) and any(target not in container_ports[d] for d in targets):
                fail(errors, where, f"Service/{name}: targetPort {target!r} is no container port name")

    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not any(selects(pdb["spec"]["selector"].get("matchLabels"), l) for l in pod_labels.values()):
            fail(errors, where, f"PodDisruptionBudget/{name}: its selector matches no Deployment's pods")

    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            fail(errors, where, f"HorizontalPodAutoscaler/{name}: scaleTargetRef {ref} is not a Deployment here")

    for name, monitor in by_kind.get("ServiceMonitor", {}).items():
        selector = ((monitor.get("spec") or {}).get("selector") or {}).get("matchLabels")
        matched = [s for s in services.values() if selects(selector, (s["metadata"].get("labels") or {}))]
        if not matched:
            fail(errors, where, f"ServiceMonitor/{name}: its selector matches no Service")
        for endpoint in monitor["spec"].get("endpoints", []):
            port = endpoint.get("port")
            for s in matched:
                if port is not None and port not in {p.get("name") for p in s["spec"].get("ports", [])}:
                    fail(errors, where, f"ServiceMonitor/{name}: Service/{s['metadata']['name']} has no port {port!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", action="append", required=True)
    parser.add_argument("--cross-references", action="store_true")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    errors = []
    checked = 0
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            try:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
            except yaml.YAMLError as e:
                fail(errors, path, f"not valid YAML: {e}")
                continue
        if not docs:
            fail(errors, path, "no documents")
            continue
        seen = set()
        for doc in docs:
            if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind", "metadata")):
                fail(errors, path, f"not a Kubernetes object: {str(doc)[:80]}")
                continue
            kind, name = doc["kind"], (doc["metadata"] or {}).get("name")
            where = f"{path}: {kind}/{name}"
            if not name:
                fail(errors, where, "metadata.name is missing")
            if (kind, name) in seen:
                fail(errors, where, "defined twice")
            seen.add((kind, name))
            checked += 1
            if kind in CUSTOM_CHECKS:
                before = len(errors)
                CUSTOM_CHECKS[kind](doc, where, errors)
                if len(errors) == before:
                    print(f"ok    {where} (custom resource: structural check, no schema ships for it)")
                continue
            for version in args.kubernetes_version:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    field = ".".join(str(p) for p in e.path) or "(document)"
                    fail(errors, where, f"Kubernetes {version}: {field}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    fail(errors, where, f"Kubernetes {version} has no schema for {doc['apiVersion']} {kind}")
                    break
            else:
                print(f"ok    {where} (Kubernetes {', '.join(args.kubernetes_version)}, strict)")
        if args.cross_references:
            cross_references([d for d in docs if isinstance(d, dict) and "kind" in d], path, errors)

    for error in errors:
        print(f"ERROR {error}")
    print(f"{checked} document(s) checked, {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
