"""Shared facts for the deployment tests."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]

# The Prometheus series the server exposes (issue 4), with their types.
METRICS = {
    "switchboard_open_sockets": "gauge",
    "switchboard_sessions_opened_total": "counter",
    "switchboard_sessions_closed_total": "counter",
    "switchboard_messages_in_total": "counter",
    "switchboard_messages_out_total": "counter",
    "switchboard_bytes_in_total": "counter",
    "switchboard_bytes_out_total": "counter",
    "switchboard_rejects_total": "counter",
    "switchboard_sessions_replaced_total": "counter",
    "switchboard_broker_publish_seconds": "histogram",
    "switchboard_broker_reconnects_total": "counter",
    "switchboard_broker_probe_failures_total": "counter",
    "switchboard_broker_subscribe_refused_total": "counter",
    "switchboard_broker_dead_connections_total": "counter",
    "switchboard_http_connections": "gauge",
    "switchboard_pair_subscriptions": "gauge",
    "switchboard_call_setup_seconds": "histogram",
    "switchboard_session_setup_seconds": "histogram",
}

# Environment keys the server reads (brief + issue 4).
ENV_KEYS = [
    "SWITCHBOARD_LISTEN",
    "SWITCHBOARD_REDIS_URL",
    "SWITCHBOARD_CHANNEL_PREFIX",
    "SWITCHBOARD_MAX_MESSAGE_BYTES",
    "SWITCHBOARD_LOG_FORMAT",
    "SWITCHBOARD_ICE_SERVERS",
    "SWITCHBOARD_STATIC_DIR",
    "SWITCHBOARD_DRAIN_SECS",
    "RUST_LOG",
]


# Diagnostics for failed tests: a fixture registers a callable with
# `add_diagnosis(request, title, fn)`; when a test that uses it fails, each
# callable's text is shown as a section of the failure report (for example
# nginx's error log and the tail of a server's log).
_DIAGNOSES = pytest.StashKey[list]()


def add_diagnosis(request, title: str, fn) -> None:
    """Shows `fn()` under `title` in the report of every failed test that
    runs while `request`'s fixture is set up."""
    node = request.node
    node.stash.setdefault(_DIAGNOSES, []).append((title, fn))
    request.addfinalizer(lambda: node.stash[_DIAGNOSES].remove((title, fn)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for node in item.listchain():
            for title, fn in node.stash.get(_DIAGNOSES, []):
                try:
                    text = fn()
                except Exception as e:  # the diagnosis must not hide the failure
                    text = f"(could not be read: {e!r})"
                report.sections.append((title, text or "(empty)"))
    return report


def switchboard_binary() -> Path:
    """The server the deploy tests run: SWITCHBOARD_BIN, else the debug or release build."""
    if os.environ.get("SWITCHBOARD_BIN"):
        return Path(os.environ["SWITCHBOARD_BIN"])
    for p in (REPO / "target" / "debug" / "switchboard", REPO / "target" / "release" / "switchboard"):
        if p.is_file():
            return p
    pytest.skip("switchboard is not built (cargo build -p switchboard; `cargo test --workspace` builds it)")
