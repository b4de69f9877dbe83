"""The alerting rules in deploy/prometheus, checked by Prometheus itself.

``promtool check rules`` and ``promtool test rules`` run the rules' unit tests (made-up series
in esmc-alerts.test.yaml); every alert has a test in which it fires. Then a real Prometheus
scrapes a real ``esmc serve`` on loopback, with the shipped rules (only EsmcNotServing's
``for`` shortened), and EsmcNotServing fires once SIGTERM has turned the server NOT_SERVING
while it keeps answering for its drain delay. promtool and prometheus come from the Debian
package ``prometheus`` (``apt-get install prometheus``), which CI installs.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers.processes import ServeProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "esmc-alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "esmc-alerts.test.yaml"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: apt-get install prometheus (the Debian package has both)"
    return path


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


@pytest.mark.unit
def test_rules_are_valid_and_pass_their_unit_tests():
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    tested = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name],
        capture_output=True, text=True, cwd=RULE_TESTS.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@pytest.mark.unit
def test_every_alert_has_a_unit_test_in_which_it_fires_and_one_in_which_it_does_not():
    fires, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(alert_rules())
    # an alert that is quiet in no test could be one that always fires
    assert quiet == set(alert_rules())


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def query(base: str, promql: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    return get_json(url)["data"]["result"]


def alerts(base: str, name: str) -> list[dict]:
    return [a for a in get_json(f"{base}/api/v1/alerts")["data"]["alerts"]
            if a["labels"]["alertname"] == name]


def wait_for(what: str, predicate, timeout_s: float, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            value = predicate()
        except OSError:  # not listening yet
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.e2e
def test_prometheus_scraping_a_live_server_fires_not_serving_after_sigterm(tmp_path):
    prometheus = tool("prometheus")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "EsmcNotServing":
                rule["for"] = "2s"  # the expression as shipped; only the wait is shortened
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))

    with ServeProcess("esmc-tiny", ["--drain-delay-s", "120", "--grace-s", "0"]) as server:
        web = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yaml")],
            "scrape_configs": [{
                "job_name": "esmc",
                "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
            }],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = tmp_path / "prometheus.log"
        base = f"http://127.0.0.1:{web}"
        with log.open("w") as out:
            process = subprocess.Popen(
                [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            # serving: scraped, the gauge is 1 and nothing is pending
            serving = wait_for(
                "esmc_health_serving == 1 scraped",
                lambda: query(base, 'esmc_health_serving{job="esmc"} == 1'), 60, process, log,
            )
            assert serving[0]["metric"]["instance"] == f"127.0.0.1:{server.metrics_port}"
            time.sleep(3)  # longer than the shortened for:, at 1 s evaluations
            assert alerts(base, "EsmcNotServing") == []
            assert query(base, 'up{job="esmc"}')[0]["value"][1] == "1"

            server.signal(signal.SIGTERM)  # NOT_SERVING, still answering for 120 s
            firing = wait_for(
                "EsmcNotServing firing",
                lambda: [a for a in alerts(base, "EsmcNotServing") if a["state"] == "firing"],
                60, process, log,
            )
            assert server.process.poll() is None  # still draining: the alert is the drain's
            (alert,) = firing
            assert alert["labels"]["instance"] == f"127.0.0.1:{server.metrics_port}"
            assert alert["labels"]["severity"] == "critical"
            assert query(base, 'esmc_health_serving{job="esmc"}')[0]["value"][1] == "0"
            assert alerts(base, "EsmcEngineFailed") == []  # a drain is not a fault
        finally:
            process.terminate()
            process.wait(30)
            server.kill()
