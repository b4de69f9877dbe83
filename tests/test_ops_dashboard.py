"""The Grafana dashboard in deploy/grafana, checked against a live server.

The JSON is what deploy/grafana/dashboard.py writes; every metric a panel or a variable
queries is on the /metrics of a real ``esmc serve`` after some traffic; and a real Prometheus
scraping that server accepts every panel query and returns series for it (prometheus: the
Debian package, which CI installs).
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from esmc_client import ESMCClient
from esmc_client.types import ESMCError, GenerationConfig, LogitsConfig
from helpers.metrics import scrape_metrics
from helpers.processes import ServeProcess, free_port
from test_ops_alerts import tool

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
# a panel whose series appear only when the server sheds load
EMPTY_WITHOUT_SHEDDING = {"Shed load"}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
    # aggregations, which may read `sum by (x) (...)`
    "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values",
}


def dashboard() -> dict:
    return json.loads((GRAFANA / "esmc.json").read_text())


def panel_queries() -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every panel target."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def variable_queries() -> list[str]:
    """The series selector of each ``label_values(SELECTOR, label)`` variable."""
    queries = [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    selectors = [re.fullmatch(r"label_values\((.+),\s*\w+\)", q) for q in queries]
    assert all(selectors), queries
    return [s.group(1) for s in selectors]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges, strings,
    grouping clauses and function names taken out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        following = text[match.end():].lstrip()
        word = match.group()
        if following.startswith("(") or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if text[match.start() - 1:match.start()] == "$":  # a dashboard variable
            continue
        names.add(word)
    return names


@pytest.mark.unit
def test_metric_names_reads_selectors_not_functions_labels_or_variables():
    expr = ('histogram_quantile(0.99, sum by (method, le) (rate(esmc_request_latency_seconds_bucket'
            '{job=~"$job", code="OK"}[$__rate_interval]))) / ignoring (code) group_left '
            'sum(up) - time()')
    assert metric_names(expr) == {"esmc_request_latency_seconds_bucket", "up"}


@pytest.mark.unit
def test_the_json_is_what_the_generator_writes():
    generated = runpy.run_path(str(GRAFANA / "dashboard.py"))["dashboard"]()
    assert dashboard() == json.loads(json.dumps(generated))
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dashboard()["panels"]}
    for needed in ("Traffic by method", "Errors by code", "Latency by method", "Batch size",
                   "Forwards and tokens", "Queue depth", "Generations in progress",
                   "Resident memory", "Requests by caller", "Token-forwards by caller"):
        assert needed in titles


def drive_traffic(target: str) -> None:
    """Every kind of series the dashboard reads: unary calls, a generation, an error."""
    with ESMCClient(target) as client:
        client.info(timeout=30)
        client.logits("MKTAYIAKQRQISFVKSHFSRQ", LogitsConfig(sequence=True), timeout=60)
        protein = client.generate("MKT____AKQ", GenerationConfig(num_steps=4), seed=1, timeout=60)
        assert "_" not in protein.sequence
        with pytest.raises(ESMCError):
            client.logits("", timeout=30)  # INVALID_ARGUMENT: an empty protein


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # a bad query: 400 with the parser's message
        return json.loads(e.read())


@pytest.mark.e2e
def test_every_panel_queries_metrics_a_live_server_exports(tmp_path):
    prometheus = tool("prometheus")
    with ServeProcess("esmc-tiny") as server:
        drive_traffic(server.target)
        exported = {name for name, _labels in scrape_metrics(server.metrics_port)} | {"up"}
        queried = set()
        for expr in [e for _t, e in panel_queries()] + variable_queries():
            queried |= metric_names(expr)
        assert queried - exported == set(), "panels query metrics the server does not export"
        assert len(queried) >= 20, queried

        web = free_port()
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{
                "job_name": "esmc",
                "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
            }],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = tmp_path / "prometheus.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{web}"
        try:
            deadline = time.monotonic() + 60
            scrapes = []
            while time.monotonic() < deadline and len(scrapes) < 1:
                assert process.poll() is None, log.read_text()
                try:
                    scrapes = query(base, 'count_over_time(up{job="esmc"}[1m]) >= 4')["data"]["result"]
                except OSError:
                    pass
                time.sleep(0.5)
            assert scrapes, "Prometheus did not scrape the server 4 times:\n" + log.read_text()
            for title, expr in panel_queries():
                concrete = (expr.replace("$__rate_interval", "1m").replace("$job", ".*")
                            .replace("$instance", ".*"))
                answer = query(base, concrete)
                assert answer["status"] == "success", (title, expr, answer)
                if title not in EMPTY_WITHOUT_SHEDDING:
                    assert answer["data"]["result"], (title, concrete)
        finally:
            process.terminate()
            process.wait(30)
