"""Run the real serving path in this process, drive a few ticks through MQTT, report what was imported.

Used by tests/runtime/test_serve.py in a subprocess: `python serve_probe.py CONFIG TICKS` prints one
JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

from blockmarket.cli import build_parser
from blockmarket.core.config import load_config
from blockmarket.core.logs import setup_logging
from blockmarket.wire.messages import MarketTick, encode_tick
from blockmarket.wire.topics import Topics
from blockmarket.wire.transport import MqttLink
from runtime.server import RuntimeServer


async def probe(config_path: str, ticks: int) -> dict[str, object]:
    build_parser()  # what `blockmarket run` imports first: every subcommand's module
    config = load_config(config_path)
    setup_logging(config.logging)
    server = RuntimeServer(config)
    serving = asyncio.create_task(server.serve())
    await asyncio.wait_for(server.ready.wait(), 120)
    assert server.population is not None and server.scheduler is not None
    answers: list[bytes] = []
    topics = Topics(config.mqtt.topic_prefix)
    client = MqttLink(
        config.mqtt, client_id="probe", subscriptions={topics.matrices: lambda p, *_: answers.append(p)}
    )
    link = asyncio.create_task(client.run())
    await asyncio.wait_for(client.connected.wait(), 10)
    ids, n = server.population.agent_ids, server.population.num_items
    for number in range(ticks):
        tick = MarketTick(number, time.time(), ids, np.full((len(ids), n), 5.0, np.float32),
                          np.zeros(len(ids), np.float32), np.ones(len(ids), np.float32))  # fmt: skip
        await client.publish(topics.tick, encode_tick(tick))
        deadline = time.monotonic() + 10
        while len(answers) <= number and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    server.stop()
    code = await serving
    await client.disconnect()
    link.cancel()
    return {
        "exit_code": code,
        "answers": len(answers),
        "agents": len(ids),
        "torch_imported": "torch" in sys.modules,
        "converter_imported": "conversion.converter" in sys.modules,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(sys.argv[1], int(sys.argv[2])))))
