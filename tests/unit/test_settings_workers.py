"""--workers: "auto" is one per CPU; per-user limits are divided among the workers."""

from __future__ import annotations

import os

from gateway.settings import WORKER_GROUP_ENV, Settings, load
from gateway.workers import child_environment


def test_auto_is_one_worker_per_cpu() -> None:
    assert load({"MEMPHIS_GATEWAY_WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))
    assert load({}, {"workers": "auto"}).workers == len(os.sched_getaffinity(0))


def test_children_divide_the_per_user_limits() -> None:
    s = Settings(workers=3, rate_limit_rps=30.0, rate_limit_bytes_per_s=3000.0, max_streams_per_user=16,
                 jwt_secret="x" * 40)
    env = child_environment(s, "nats://127.0.0.1:6666", 0, "g1")
    assert float(env["MEMPHIS_GATEWAY_RATE_LIMIT_RPS"]) == 10.0
    assert float(env["MEMPHIS_GATEWAY_RATE_LIMIT_BYTES_PER_S"]) == 1000.0
    assert int(env["MEMPHIS_GATEWAY_MAX_STREAMS_PER_USER"]) == 6  # ceil(16 / 3): at least the configured total
    assert env[WORKER_GROUP_ENV] == "g1"
