"""Grafana dashboard, Prometheus alert rules and docs/operations.md against the
series the server exposes: every query parses as PromQL, names only known
series, and every series is shown, documented and covered."""

import json
import re

import promql_parser
import pytest
import yaml

from conftest import ENV_KEYS, METRICS, REPO

DASHBOARD = REPO / "deploy" / "grafana" / "switchboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DOC = REPO / "docs" / "operations.md"
SUFFIXES = ("_bucket", "_sum", "_count")


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables, replaced by values Prometheus would see."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
            .replace("$instance", ".*"))


def series_in(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:
                name = next(m.value for m in node.matchers.matchers if m.name == "__name__")
            names.add(name)
    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def base(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s) and name[: -len(s)] in METRICS:
            return name[: -len(s)]
    return name


def check_names(names: set[str]):
    for n in names:
        b = base(n)
        if b == "up":
            continue
        assert b in METRICS, f"unknown series {n}"
        if METRICS[b] == "histogram":
            assert n != b, f"{n} is a histogram: query {n}_bucket/_sum/_count"
        else:
            assert n == b, n


def dashboard_panels():
    dash = json.loads(DASHBOARD.read_text())
    return dash, [p for p in dash["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels()[1] for t in p["targets"]]


def test_dashboard_is_importable():
    dash, panels = dashboard_panels()
    assert dash["uid"] and dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    var = {v["name"]: v for v in dash["templating"]["list"]}
    assert var["datasource"]["type"] == "datasource" and var["datasource"]["query"] == "prometheus"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        assert p["targets"], p["title"]


def test_dashboard_panels_do_not_overlap():
    _, panels = dashboard_panels()
    cells = {}
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_query_is_valid_promql(expr):
    check_names(series_in(grafana_to_promql(expr)))
    assert '$instance' in expr, "every query follows the replica filter"


def test_dashboard_shows_every_series():
    shown = {base(n) for e in dashboard_exprs() for n in series_in(grafana_to_promql(e))}
    assert shown == set(METRICS)


def test_parser_rejects_nonsense():
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(switchboard_messages_in_total[5m])")


def alert_rules():
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_rule(rule):
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
    assert rule["alert"].startswith("Switchboard")
    check_names(series_in(rule["expr"]))
    assert rule["labels"]["severity"] in {"page", "warn", "info"}
    assert rule["annotations"]["summary"]
    if "for" in rule:
        assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_alerts_cover_broker_and_rejects():
    used = {base(n) for r in alert_rules() for n in series_in(r["expr"])}
    for m in ["switchboard_broker_reconnects_total", "switchboard_broker_publish_seconds",
              "switchboard_rejects_total", "switchboard_call_setup_seconds"]:
        assert m in used


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/operations.md has no '## {title}' section"
    return m.group(1)


def test_doc_has_the_sections():
    text = DOC.read_text()
    for title in ["Configuration", "Scaling", "Redis", "The drain (rolling restarts)", "Metrics", "Alerts"]:
        assert section(text, title).strip()


def server_env_keys() -> set[str]:
    """The variables the server reads: the rows of SETTINGS in its config
    module (`text("key", ...)` / `whole("key", ...)`), and OTHER_VARS."""
    src = (REPO / "crates" / "switchboard" / "src" / "config.rs").read_text()
    m = re.search(r"pub const SETTINGS: &\[Setting\] = &\[(.*?)\n\];", src, re.S)
    assert m, "SETTINGS not found in crates/switchboard/src/config.rs"
    keys = {"SWITCHBOARD_" + k.upper() for k in re.findall(r'\b(?:text|whole)\(\s*"([a-z_]+)"', m.group(1))}
    other = re.search(r"const OTHER_VARS: &\[&str\] = &\[(.*?)\];", src, re.S)
    assert other, "OTHER_VARS not found in crates/switchboard/src/config.rs"
    return keys | set(re.findall(r'"(SWITCHBOARD_[A-Z_]+)"', other.group(1)))


def test_doc_lists_every_env_key():
    conf = section(DOC.read_text(), "Configuration")
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", conf, re.M))
    server = server_env_keys()
    assert len(server) >= 8
    missing = (set(ENV_KEYS) | server) - documented
    assert not missing, f"undocumented: {sorted(missing)}"
    unknown = {k for k in documented - server - set(ENV_KEYS)}
    assert not unknown, f"documented but not read by the server: {sorted(unknown)}"


def test_doc_describes_every_series_with_its_type():
    metrics = section(DOC.read_text(), "Metrics")
    rows = dict(re.findall(r"^\| `(switchboard_\w+)` \| (\w+) \|", metrics, re.M))
    assert rows == METRICS


def test_doc_explains_every_alert():
    alerts = section(DOC.read_text(), "Alerts")
    documented = set(re.findall(r"^\| `(Switchboard\w+)` \|", alerts, re.M))
    assert documented == {r["alert"] for r in alert_rules()}


def test_doc_queries_are_valid_promql():
    text = DOC.read_text()
    blocks = re.findall(r"```promql\n(.*?)```", text, re.S)
    assert blocks
    for line in "".join(blocks).splitlines():
        expr = line.split("#")[0].strip()
        if expr:
            check_names(series_in(expr))


def test_doc_drain_matches_the_manifests():
    drain = section(DOC.read_text(), "The drain (rolling restarts)")
    cm = yaml.safe_load((REPO / "deploy" / "k8s" / "configmap.yaml").read_text())
    dep = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    d = cm["data"]["SWITCHBOARD_DRAIN_SECS"]
    sg = cm["data"]["SWITCHBOARD_SHUTDOWN_GRACE_SECS"]
    g = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert f"drain {d} s, shutdown grace {sg} s, termination grace {g} s" in " ".join(drain.split())
    assert "1012" in drain


def test_doc_lists_the_servers_reason_labels():
    """Every close and reject reason the server can put in a `reason` label."""
    src = REPO / "crates" / "switchboard" / "src"
    protocol = (src / "protocol.rs").read_text()
    labels = protocol[protocol.index("pub fn label(self)"):]
    labels = labels[:labels.index("\n    }\n")]
    closes = set(re.findall(r'Self::\w+ => "(\w+)"', labels))
    closes |= set(re.findall(r'End::\w+(?:\(_\))? => "(\w+)"', (src / "session" / "mod.rs").read_text()))
    rejects = set(re.findall(r'ApiError::\w+(?: \{ \.\. \})? => "(\w+)"', (src / "error.rs").read_text()))
    rejects |= set(re.findall(r'FrameError::\w+\(_\) => "(\w+)"', (src / "protocol.rs").read_text()))
    rejects |= set(re.findall(r'metrics::reject\("(\w+)"\)', (src / "session" / "mod.rs").read_text()))
    assert len(closes) >= 8 and len(rejects) >= 6, (closes, rejects)
    metrics = section(DOC.read_text(), "Metrics")
    missing = sorted(r for r in closes | rejects if f"`{r}`" not in metrics)
    assert not missing, f"reasons not documented: {missing}"
