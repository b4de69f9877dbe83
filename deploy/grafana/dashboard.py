"""Writes deploy/grafana/esmc.json, the Grafana dashboard of esmc serve.

    python deploy/grafana/dashboard.py > deploy/grafana/esmc.json

Edit the panels here, not the JSON (tests/test_ops_dashboard.py checks that the JSON is this
script's output and that every metric a panel queries exists on a live server).
Import the JSON in Grafana (Dashboards > New > Import) and pick the Prometheus data source.
"""

from __future__ import annotations

import json

SEL = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"


def target(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": {"uid": "${datasource}"}}


def panel(title: str, description: str, targets: list[dict], unit: str = "short",
          width: int = 12, kind: str = "timeseries") -> dict:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}},
        "targets": targets,
        "gridPos": {"w": width, "h": 8},
    }


def quantiles(metric: str, by: str = "") -> list[dict]:
    group = f"{by}, le" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [
        target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"{legend}p{int(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


PANELS = [
    row("Service"),
    panel("Serving", "1: health SERVING; 0: draining or failed (alert EsmcNotServing). "
          "up 0: not scraped (EsmcTargetDown).", [
              target(f"esmc_health_serving{{{SEL}}}", "serving {{instance}}"),
              target(f"up{{{SEL}}}", "up {{instance}}"),
              target(f"esmc_engine_failed{{{SEL}}}", "engine failed {{instance}}"),
          ], width=8),
    panel("Traffic by method", "Requests answered per second (an Embed or PLL stream: per item).", [
        target(f"sum by (method) (rate(esmc_requests_total{{{SEL}}}[{RATE}]))", "{{method}}"),
    ], unit="reqps", width=8),
    panel("Errors by code", "Errors per second by status code. RESOURCE_EXHAUSTED is load shed "
          "(retry later); INVALID_ARGUMENT and UNAUTHENTICATED are the caller's.", [
              target(f"sum by (code) (rate(esmc_errors_total{{{SEL}}}[{RATE}]))", "{{code}}"),
          ], unit="reqps", width=8),
    panel("Error ratio", "Share of requests that ended in an error, by code "
          "(alerts EsmcServerErrors and EsmcCallerErrors).", [
              target(
                  f"sum by (code) (rate(esmc_errors_total{{{SEL}}}[{RATE}])) / ignoring (code) "
                  f"group_left sum (rate(esmc_requests_total{{{SEL}}}[{RATE}]))",
                  "{{code}}",
              ),
          ], unit="percentunit", width=8),
    panel("Latency by method", "p50 and p99 of each method (a Generate stream: its whole "
          "duration). Alerts: EsmcLatencyP99High, EsmcControlLatencyHigh.",
          quantiles("esmc_request_latency_seconds", "method"), unit="s", width=16),
    row("Batching and the device"),
    panel("Forwards and tokens", "Model forwards per second; tokens computed per second "
          "(padded when padding) and real tokens.", [
              target(f"sum (rate(esmc_forwards_total{{{SEL}}}[{RATE}]))", "forwards/s"),
              target(f"sum (rate(esmc_tokens_total{{{SEL}}}[{RATE}]))", "tokens/s"),
              target(f"sum (rate(esmc_real_tokens_total{{{SEL}}}[{RATE}]))", "real tokens/s"),
          ], width=8),
    panel("Batch size", "Sequences and tokens per forward (mean over the interval). Near "
          "max_batch_tokens: the device is full.", [
              target(f"sum (rate(esmc_batch_size_sequences_sum{{{SEL}}}[{RATE}])) / "
                     f"sum (rate(esmc_batch_size_sequences_count{{{SEL}}}[{RATE}]))", "sequences"),
              target(f"sum (rate(esmc_batch_size_tokens_sum{{{SEL}}}[{RATE}])) / "
                     f"sum (rate(esmc_batch_size_tokens_count{{{SEL}}}[{RATE}]))", "tokens"),
          ], width=8),
    panel("Token efficiency", "Real tokens / tokens computed (1: no padding waste).", [
        target(f"sum (rate(esmc_real_tokens_total{{{SEL}}}[{RATE}])) / "
               f"sum (rate(esmc_tokens_total{{{SEL}}}[{RATE}]))", "real / computed"),
    ], unit="percentunit", width=8),
    panel("Forward time", "Duration of one forward, p50 and p99.",
          quantiles("esmc_compute_time_seconds"), unit="s", width=12),
    panel("Sequences per second", "Sequences computed per second.", [
        target(f"sum by (instance) (rate(esmc_sequences_total{{{SEL}}}[{RATE}]))", "{{instance}}"),
    ], width=12),
    row("Queue"),
    panel("Queue depth", "Requests waiting for a forward, and max_queue (alert "
          "EsmcQueueSaturated at 80%).", [
              target(f"esmc_queue_depth{{{SEL}}}", "waiting {{instance}}"),
              target(f"esmc_queue_capacity{{{SEL}}}", "capacity {{instance}}"),
          ], width=8),
    panel("Queue wait", "Arrival to the start of the serving forward, p50 and p99 (alert "
          "EsmcQueueWaitHigh).", quantiles("esmc_queue_time_seconds"), unit="s", width=8),
    panel("Shed load", "Requests pushed back with RESOURCE_EXHAUSTED per second (alert "
          "EsmcSheddingLoad).", [
              target(f'sum by (method) (rate(esmc_errors_total{{{SEL}, code="RESOURCE_EXHAUSTED"}}[{RATE}]))',
                     "{{method}}"),
          ], unit="reqps", width=8),
    row("Generations"),
    panel("Generations in progress", "Generate streams being stepped.", [
        target(f"esmc_active_generations{{{SEL}}}", "{{instance}}"),
    ], width=8),
    panel("Generation steps", "Steps per second, all generations together.", [
        target(f"sum (rate(esmc_generation_steps_total{{{SEL}}}[{RATE}]))", "steps/s"),
    ], width=8),
    panel("Steps per forward", "Generation steps sharing one forward (mean): continuous "
          "batching at work when above 1.", [
              target(f"sum (rate(esmc_generation_steps_per_forward_sum{{{SEL}}}[{RATE}])) / "
                     f"sum (rate(esmc_generation_steps_per_forward_count{{{SEL}}}[{RATE}]))",
                     "steps/forward"),
          ], width=8),
    row("Callers"),
    panel("Requests by caller", "Requests answered per second, by caller (the token's name, "
          "or anonymous without auth).", [
              target(f"sum by (caller) (rate(esmc_caller_requests_total{{{SEL}}}[{RATE}]))",
                     "{{caller}}"),
          ], unit="reqps", width=8),
    panel("Refused by caller", "Requests of each caller that did not end OK, by code "
          "(RESOURCE_EXHAUSTED: the caller is over its share or the limits).", [
              target(f'sum by (caller, code) (rate(esmc_caller_requests_total{{{SEL}, code!="OK"}}[{RATE}]))',
                     "{{caller}} {{code}}"),
          ], unit="reqps", width=8),
    panel("Token-forwards by caller", "Cost admitted per second (tokens x forwards of each "
          "call), by caller: who uses the device.", [
              target(f"sum by (caller) (rate(esmc_caller_token_forwards_total{{{SEL}}}[{RATE}]))",
                     "{{caller}}"),
          ], width=8),
    panel("Tokens by caller", "Tokens forwarded per second, by caller.", [
        target(f"sum by (caller) (rate(esmc_caller_tokens_total{{{SEL}}}[{RATE}]))", "{{caller}}"),
    ], width=12),
    panel("Queue wait by caller", "p99 wait for a forward, by caller (fair sharing keeps these "
          "close).", [
              target(f"histogram_quantile(0.99, sum by (caller, le) "
                     f"(rate(esmc_caller_queue_time_seconds_bucket{{{SEL}}}[{RATE}])))", "{{caller}}"),
          ], unit="s", width=12),
    row("Process"),
    panel("Resident memory", "process_resident_memory_bytes (alert EsmcMemoryGrowing).", [
        target(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}"),
    ], unit="bytes", width=8),
    panel("CPU", "CPU seconds per second of the server process.", [
        target(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}"),
    ], width=8),
    panel("Uptime", "Time since the process started (restarts: alert EsmcRestarting).", [
        target(f"time() - process_start_time_seconds{{{SEL}}}", "{{instance}}"),
    ], unit="s", width=8),
    panel("Unread response bytes", "Response bytes reserved and not yet written to clients, all "
          "calls and streams (bounded by max_unread_response_bytes: at the bound new work is "
          "pushed back).", [
              target(f"esmc_unread_response_bytes{{{SEL}}}", "{{instance}}"),
          ], unit="bytes", width=12),
    panel("Stream ids", "Ids remembered by open keyed streams (Embed, PLL; bounded by "
          "max_stream_ids).", [
              target(f"esmc_stream_ids{{{SEL}}}", "{{instance}}"),
          ], width=12),
]


def variable(name: str, query: str) -> dict:
    return {
        "name": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard() -> dict:
    panels, x, y, height = [], 0, 0, 0
    for number, p in enumerate(PANELS, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + height
            height = 0
        p = {**p, "id": number, "gridPos": {"x": x, "y": y, "w": w, "h": h}}
        for ref, t in zip("ABCDEFGH", p.get("targets", [])):
            t["refId"] = ref
        panels.append(p)
        x, height = x + w, max(height, h)
        if x >= 24:
            x, y, height = 0, y + height, 0
    return {
        "title": "esmc serve",
        "uid": "esmc-serve",
        "tags": ["esmc"],
        "timezone": "",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            variable("job", "label_values(esmc_health_serving, job)"),
            variable("instance", 'label_values(esmc_health_serving{job=~"$job"}, instance)'),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2))
