"""/metrics, /healthz and /readyz of a real serving runtime (real broker, real sessions)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockmarket.core.config import Config, ConfigError, NpuConfig, load_config, parse_config
from runtime.metrics import STAGES
from runtime.server import RuntimeServer
from runtime.units import default_session_factory
from tests.support.serving import (
    ITEMS,
    REPO,
    GameClient,
    serving_config,
    trading_weights,
    write_model,
)
from tests.support.wire import PrivateMosquitto, wait_until

pytestmark = pytest.mark.mqtt

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextlib.asynccontextmanager
async def serving_runtime(config: Config) -> AsyncIterator[RuntimeServer]:
    """A runtime serving in this process for the block; it must stop cleanly (exit code 0)."""
    server = RuntimeServer(config, handle_signals=False)
    serving = asyncio.create_task(server.serve())
    try:
        yield server
    finally:
        server.stop()
        assert await serving == 0


def get(url: str) -> tuple[int, str]:
    """GET ``url``: (status code, body), 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def scrape(server: RuntimeServer) -> Samples:
    """/metrics parsed with prometheus_client's own parser, off the loop (the loop keeps serving)."""
    assert server.telemetry.url is not None
    code, text = await asyncio.to_thread(get, f"{server.telemetry.url}/metrics")
    assert code == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"market": "default", **labels}.items()))]


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample, labels) in samples if sample == name]


async def probe(server: RuntimeServer, path: str) -> tuple[int, dict[str, Any]]:
    assert server.telemetry.url is not None
    code, body = await asyncio.to_thread(get, f"{server.telemetry.url}{path}")
    return code, json.loads(body)


async def test_metrics_agree_with_the_retained_status_while_ticks_flow(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    config = load_config(serving_config(tmp_path, model_dir, prefix, num_agents=6))
    async with serving_runtime(config) as server, GameClient(config.mqtt, len(ITEMS)) as game:
        await game.online()
        during: Samples = {}
        sent = 0
        for number in range(40):
            await game.send(game.tick(number))
            sent += 1
            if number % 10 == 3:
                await game.send_raw(b"\xc1 not msgpack")  # dropped: malformed
                await game.send_raw(b"\x81\xa1v\x02")  # dropped: version
                sent += 2
            if number == 20:  # scraped while ticks flow
                during = await scrape(server)
            await asyncio.sleep(0.01)
        received = value(during, "blockmarket_ticks_received_total")
        assert 0 < received <= sent
        assert value(during, "blockmarket_tick_seconds_count") <= received

        def settled() -> bool:
            status = game.status
            return status.get("ticks_received") == sent and status.get("ticks_in_flight") == 0

        await wait_until(settled, 20, f"a status counting all {sent} messages")
        status, roster = game.status, game.roster
        after = await scrape(server)

    for key in ("ticks_received", "ticks_served", "ticks_skipped", "ticks_unpublished", "inference_errors"):
        assert value(after, f"blockmarket_{key}_total") == status[key], key
    assert value(after, "blockmarket_guarded_outputs_total") == status["guarded_outputs"]
    assert value(after, "blockmarket_reload_failures_total") == status["reload_failures"]
    assert value(after, "blockmarket_pool_generation") == status["pool_generation"]
    assert value(after, "blockmarket_ticks_in_flight") == 0
    dropped = {labels["kind"]: after[("blockmarket_ticks_dropped_total", frozenset(labels.items()))]
               for labels in labelled(after, "blockmarket_ticks_dropped_total")}  # fmt: skip
    assert dropped == status["dropped"] == {"malformed": 4, "version": 4}
    served = status["ticks_served"]
    assert served > 0 and value(after, "blockmarket_tick_seconds_count") == served
    decoded = value(after, "blockmarket_tick_stage_seconds_count", stage="decode")
    assert decoded == served + status["ticks_skipped"]  # every valid tick, decoded on arrival
    for stage in STAGES[1:]:
        assert value(after, "blockmarket_tick_stage_seconds_count", stage=stage) == served, stage
        assert value(after, "blockmarket_tick_stage_seconds_sum", stage=stage) > 0, stage
    units = labelled(after, "blockmarket_unit_info")
    assert {u["provider"] for u in units} == {"CPUExecutionProvider"}
    for unit in units:
        name = unit["unit"]
        assert value(after, "blockmarket_unit_inference_seconds_count", unit=name) == served
        assert value(after, "blockmarket_unit_nodes", unit=name, provider="QNN") == 0  # npu.enabled: false
        assert value(after, "blockmarket_unit_nodes", unit=name, provider="CPU") > 0
    assert sum(value(after, "blockmarket_unit_agents", unit=u["unit"]) for u in units) == 6
    assert roster is not None
    versions = {m["model"]: m["version"] for m in labelled(after, "blockmarket_model_info")}
    assert versions == roster.model_versions
    assert value(after, "blockmarket_broker_connected") == 1
    assert value(after, "blockmarket_broker_reconnects_total") == 0
    assert after[("process_resident_memory_bytes", frozenset())] > 10e6


async def test_readyz_follows_the_pool_and_the_broker(tmp_path: Path, model_dir: Path) -> None:
    broker = PrivateMosquitto(tmp_path)
    broker.start()
    gate = threading.Event()  # holds the pool build: the runtime is up but not ready yet
    real = default_session_factory(NpuConfig(enabled=False), 1, False)

    def gated(path: Path, prefer_npu: bool) -> tuple[Any, str]:
        gate.wait(60)
        return real(path, prefer_npu)

    mqtt = {"port": broker.port, "embedded_broker": "never", "reconnect_max_backoff_s": 0.2}
    config = load_config(serving_config(tmp_path, model_dir, "readyz", mqtt=mqtt, num_agents=3))
    server = RuntimeServer(config, session_factory=gated, handle_signals=False)
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.telemetry.url is not None, 30, "the HTTP endpoints")
        code, body = await probe(server, "/readyz")
        assert (code, body["ready"]) == (503, False) and body["reason"].startswith("starting"), body
        assert (await probe(server, "/healthz"))[0] == 200  # alive while the pool is being built
        gate.set()
        await asyncio.wait_for(server.ready.wait(), 60)
        assert await probe(server, "/readyz") == (200, {"ready": True})

        broker.stop()
        await until_probe(server, "/readyz", 503)
        code, body = await probe(server, "/readyz")
        assert (
            code == 503 and f"not connected to the MQTT broker at 127.0.0.1:{broker.port}" in body["reason"]
        )
        assert value(await scrape(server), "blockmarket_broker_connected") == 0
        assert (await probe(server, "/healthz"))[0] == 200  # alive: only not ready

        broker.start()
        await until_probe(server, "/readyz", 200)
        samples = await scrape(server)
        assert value(samples, "blockmarket_broker_connected") == 1
        assert value(samples, "blockmarket_broker_reconnects_total") >= 1
    finally:
        gate.set()
        server.stop()
        await serving
        broker.stop()
    assert server.telemetry.url is None  # the endpoints stop with the runtime


async def until_probe(server: RuntimeServer, path: str, code: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await probe(server, path))[0] != code:
        assert time.monotonic() < deadline, f"{path} never answered {code}"
        await asyncio.sleep(0.1)


async def test_healthz_reports_a_stalled_loop(tmp_path: Path, model_dir: Path, prefix: str) -> None:
    http = {"enabled": True, "host": "127.0.0.1", "port": 0, "max_loop_lag_s": 0.5}
    config = load_config(serving_config(tmp_path, model_dir, prefix, num_agents=3, http=http))
    async with serving_runtime(config) as server:
        await asyncio.wait_for(server.ready.wait(), 60)
        url = f"{server.telemetry.url}/healthz"
        assert get(url)[0] == 200
        seen: list[tuple[int, str]] = []
        watcher = threading.Thread(target=poll_until_unhealthy, args=(url, seen.append), daemon=True)
        watcher.start()
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:  # the loop is stuck here: no heartbeat
            time.sleep(0.01)
        watcher.join(5)
        assert seen, "/healthz kept answering 200 while the loop was stalled"
        code, body = seen[0]
        assert code == 503 and "event loop stalled" in json.loads(body)["reason"]
        code, text = seen[1]
        lag = [s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "blockmarket_loop_lag_seconds"]  # fmt: skip
        assert code == 200 and lag[0] > 0.5
        await asyncio.sleep(0.6)  # the loop runs again: the heartbeat is fresh
        assert (await probe(server, "/healthz"))[0] == 200


def poll_until_unhealthy(url: str, report: Callable[[tuple[int, str]], None]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        code, body = get(url)
        if code != 200:  # still stalled: /metrics answers too, from the HTTP thread
            report((code, body))
            report(get(url.replace("/healthz", "/metrics")))
            return
        time.sleep(0.05)


def test_http_can_be_switched_off(tmp_path: Path, model_dir: Path, prefix: str) -> None:
    http = {"enabled": False, "host": "127.0.0.1", "port": 0, "max_loop_lag_s": 5.0}
    config = load_config(serving_config(tmp_path, model_dir, prefix, http=http))
    server = RuntimeServer(config, handle_signals=False)
    assert config.runtime.http.enabled is False

    async def briefly() -> str | None:
        serving = asyncio.create_task(server.serve())
        await asyncio.wait_for(server.ready.wait(), 60)
        url = server.telemetry.url
        server.stop()
        await serving
        return url

    assert asyncio.run(briefly()) is None


def test_runtime_http_settings_are_validated() -> None:
    http = parse_config({"runtime": {"http": {"port": 0, "max_loop_lag_s": 2}}}).config.runtime.http
    assert (http.enabled, http.host, http.port, http.max_loop_lag_s) == (True, "127.0.0.1", 0, 2.0)
    with pytest.raises(
        ConfigError, match=r"runtime\.http\.port: Input should be less than or equal to 65535"
    ):
        parse_config({"runtime": {"http": {"port": 70000}}})
    with pytest.raises(ConfigError, match=r"runtime\.http\.prot"):
        parse_config({"runtime": {"http": {"prot": 1}}})
    with pytest.raises(ConfigError, match=r"runtime\.http\.enabled"):
        parse_config({"runtime": {"http": {"enabled": "yes"}}})


def grafana_metric_names() -> set[str]:
    """Every metric name the shipped Grafana dashboard's PromQL uses (panels and variables)."""
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [
        variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable
    ]
    functions = {"histogram_quantile", "sum", "by", "rate", "increase", "label_values", "le", "market"}
    names = {name for query in queries for name in re.findall(r"[a-z_]+(?=[{(\[ ,)])|[a-z_]+$", query)}
    return {name for name in names if name not in functions and ("_" in name)}


async def test_every_metric_of_the_grafana_dashboard_is_exported_and_reloads_are_counted(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    names = grafana_metric_names()
    assert {"blockmarket_tick_seconds_bucket", "process_resident_memory_bytes"} <= names
    config = load_config(serving_config(tmp_path, model_dir, prefix, num_agents=3))
    async with serving_runtime(config) as server, GameClient(config.mqtt, len(ITEMS)) as game:
        await game.online()
        for number in range(3):
            await game.send(game.tick(number))
            await game.answer(number)
        await game.send_raw(b"\xc1")  # a dropped kind: ticks_dropped_total has a series
        await wait_until(lambda: game.status.get("ticks_received") == 4, 10, "the dropped message counted")
        samples = await scrape(server)
        write_model(model_dir, "m0", trading_weights(40), desired_item="gold", agent_id="ckpt-0")
        await wait_until(lambda: game.status.get("pool_generation") == 2, 60, "the hot reload")
        await wait_until(lambda: game.roster is not None and game.roster.pool_generation == 2, 10, "roster")
        reloaded = await scrape(server)
        roster = game.roster
    exported = {name for name, _ in samples}
    assert names <= exported, sorted(names - exported)
    assert (
        value(samples, "blockmarket_reloads_total") == 0 and value(reloaded, "blockmarket_reloads_total") == 1
    )
    assert value(reloaded, "blockmarket_pool_generation") == 2
    assert value(reloaded, "blockmarket_reload_failures_total") == 0
    versions = {m["model"]: m["version"] for m in labelled(reloaded, "blockmarket_model_info")}
    before = {m["model"]: m["version"] for m in labelled(samples, "blockmarket_model_info")}
    assert roster is not None and versions == roster.model_versions and versions["m0"] != before["m0"]
