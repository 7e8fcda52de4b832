"""The benchmark (bench/run.py) runs end to end and prints its table; no timing is asserted."""

from __future__ import annotations

import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import MSG_SIZE, Finished, payload
from bench.loadgen import _parse_h2load, _unframe, grpc_frames, wrk_script
from bench.run import Config, Measure, rows, table

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def quick_config() -> Config:
    import argparse

    return Config.from_args(argparse.Namespace(quick=True, duration=None, runs=None))


def test_only_adds_the_baselines_and_filters_the_table() -> None:
    import argparse

    cfg = Config.from_args(argparse.Namespace(quick=True, duration=None, runs=None, only="single,stream"))
    assert cfg.only == {"single", "B", "stream", "A"}
    res = {k: Measure(1.0, "x", p50_ms=1.0, p99_ms=1.0) for k in ("A", "B", "single")}
    res["stream"] = Measure(2.0, "x")  # 2x A (target 1.5x)
    res["rss"] = Measure(50.0, "MB")
    text, ok = table(cfg, res)
    labels = {line.split("|")[0].strip() for line in text.splitlines()[2:] if "|" in line}
    assert all(label.startswith(("A ", "B ", "GW REST produce/single", "GW gRPC stream", "GW peak RSS"))
               for label in labels), labels
    assert ok  # rows left out are not failures
    with pytest.raises(SystemExit):
        Config.from_args(argparse.Namespace(quick=True, duration=None, runs=None, only="singel"))


def test_payload_is_compact_json_of_the_message_size() -> None:
    import json

    body = payload()
    assert len(body) == MSG_SIZE
    assert json.dumps(json.loads(body), separators=(",", ":")).encode() == body


def test_grpc_frames_round_trip() -> None:
    framed = grpc_frames([b"a", b"", b"xyz"])
    assert framed[:5] == b"\x00" + struct.pack(">I", 1)
    assert _unframe(framed) == [b"a", b"", b"xyz"]


def test_wrk_script_quotes_headers(tmp_path: Path) -> None:
    script = wrk_script(tmp_path / 'body "x".bin', {"Authorization": 'Bearer a"b', "X-Y": "z\\w"})
    assert 'wrk.headers["Authorization"] = "Bearer a\\"b"' in script
    assert '"X-Y"] = "z\\\\w"' in script
    assert "function done(summary, latency, requests)" in script


def test_h2load_output_is_parsed() -> None:
    out = (
        "finished in 2.00s, 1500.50 req/s, 100KB/s\n"
        "requests: 3001 total, 3001 started, 3001 done, 3000 succeeded, 1 failed, 0 errored, 0 timeout\n"
        "status codes: 3000 2xx, 0 3xx, 1 4xx, 0 5xx\n"
        "time for request:     1.20ms     9.80ms     2.50ms     0.40ms    90.00%\n"
    )
    r = _parse_h2load(Finished(0, out, "", 2.1, 0.5))
    assert (r.tool, r.requests, r.errors, r.elapsed_s, r.p50_ms) == ("h2load", 3000, 2, 2.0, 2.5)


def test_table_has_every_row_with_ratios_and_verdicts() -> None:
    cfg = quick_config()
    res = {k: Measure(1000.0, "", 0.9, 0.1, 0.2, 1.0, 2.0) for k in
           ("A", "B", "C", "D", "single", "unary", "consume")}
    res["batch"] = res["stream"] = Measure(2000.0, "", 0.9, 0.1, 0.2)  # 2x raw publish_async (target 1.5x)
    res["rss"] = Measure(90.0, "MB")
    text, all_ok = table(cfg, res)
    assert all_ok  # every other ratio 1.0x, RSS under 200 MB
    for row in rows(cfg):
        assert row.label in text
    res["single"] = Measure(100.0, "", 0.9, 0.1, 0.2, 1.0, 9.0)
    res.pop("consume")
    text, all_ok = table(cfg, res)
    assert not all_ok
    assert "0.10x" in text and "4.50x" in text and "not measured" in text
    res["A"] = Measure(1000.0, "", 0.6, 0.1, None, others_cpu=0.4)  # another job shared the server CPU
    text, _ = table(cfg, res)
    assert "NOISE: CPU shared" in text and "ok?" in text


@pytest.mark.timeout(200)
def test_quick_run_prints_the_table() -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "run.py"), "--quick"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops everything it started on SIGTERM
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"bench/run.py --quick did not finish in 180 s\n{out}\n{err[-4000:]}")
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-4000:]}"
    assert "load generator:" in out and "CPU pinning:" in out
    assert "NOT RUNNING" not in out, out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("figure "))
    cells = {}
    for line in lines[header + 2:]:
        if " | " not in line:
            break
        parts = [c.strip() for c in line.split(" | ")]
        cells[parts[0]] = parts
    for row in rows(quick_config()):
        assert row.label in cells, f"row {row.label!r} missing from:\n{out}"
        parts = cells[row.label]
        assert NUMBER.match(parts[1]), f"{row.label}: value {parts[1]!r} is not a number\n{out}"
        assert parts[2] == row.unit
        if row.baseline is not None:
            ratio = parts[4]
            assert ratio.endswith("x") and not math.isnan(float(ratio[:-1])), f"{row.label}: ratio {ratio!r}"
        if row.target:
            assert parts[6].rstrip("?") in ("ok", "FAIL"), f"{row.label}: verdict {parts[6]!r}"


def test_curves_fit_slopes_and_draw_a_picture(tmp_path: Path) -> None:
    from bench.curves import Idle, Point, Results, draw, human, slope_kb

    assert slope_kb([Idle(0, 100.0, 0.0), Idle(1000, 110.0, 0.01), Idle(2000, 120.0, 0.02)]) == pytest.approx(10.24)
    assert slope_kb([Idle(0, 100.0, 0.0)]) is None
    assert (human(64), human(4096), human(1048576), human(1000)) == ("64", "4K", "1M", "1000")
    res = Results(meta={"grid": "test", "reduced": True, "command": "test"})
    res.curves["size"] = [Point(x, 1000.0 / (i + 1), 2.0 * (i + 1), 90.0 + i, 0.9, 0.01, mb_s=x * 1e-3)
                          for i, x in enumerate((64, 4096, 1048576))]
    res.curves["workers"] = [Point(1, 5000.0, 10.0, 90.0, 1.0, 0.3), Point(2, 9000.0, 8.0, 180.0, 1.9, None)]
    res.idle["connections"] = [Idle(0, 90.0, 0.0), Idle(500, 98.0, 0.001)]
    png = tmp_path / "curves.png"
    draw(res, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.to_json()["idle"]["connections"]["kb_per_item"] == pytest.approx(8 * 1024 / 500)
