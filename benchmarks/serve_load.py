"""Load and soak of ``edgedx serve`` over HTTP: latency under concurrency, then RSS over time.

Starts the daemon (the shipped default bundle unless ``--bundle``) in its own process, then

1. load: ``--concurrency`` clients (threads with keep-alive connections) POST a 512x512 synthetic
   head-CT DICOM slice to ``/v1/predict`` for ``--seconds``; every answer's status and latency
   is kept. 503 (queue full) is the daemon's deliberate back-pressure; anything else is an error.
2. soak: the same load for ``--soak-seconds`` while the daemon's RSS (``VmRSS``) is sampled every
   ``--sample-seconds``; reports first, last, peak and the least-squares slope in MB per minute.

The clients run on the same machine and share its cores with the daemon. Writes
``results/serve-load-cpu<cores>-c<concurrency>-q<queue size>.json``. Run by hand on an idle machine:

    python benchmarks/serve_load.py                     # 60 s load + 10 min soak, concurrency 32
    python benchmarks/serve_load.py --concurrency 1 --seconds 20 --soak-seconds 0   # one sender, no soak

The load phase also records the daemon's own CPU time per answer (its ``/proc/PID/stat``), which
the clients sharing the cores do not inflate.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice(work: Path) -> bytes:
    from edgedx.data import SynthConfig, synthesize

    folder = synthesize(work / "headct", SynthConfig(studies=3, slices=1, seed=7))
    return next(folder.rglob("*.dcm")).read_bytes()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hammer(port: int, body: bytes, until: float, out: list, errors: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/dicom"}
    while time.monotonic() < until:
        began = time.perf_counter()
        try:
            connection.request("POST", "/v1/predict", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            out.append((response.status, time.perf_counter() - began))
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def _run_load(port: int, body: bytes, concurrency: int, seconds: float, on_tick=None) -> dict:
    answers: list[tuple[int, float]] = []
    errors: list[str] = []
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=_hammer, args=(port, body, until, answers, errors)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if on_tick:
            on_tick()
        time.sleep(0.5)
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = np.array([s for status, s in answers if status == 200]) * 1e3
    busy = np.array([s for status, s in answers if status == 503]) * 1e3
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": len(answers),
        "statuses": statuses,
        "transport_errors": len(errors),
        "unexpected_statuses": sum(n for s, n in statuses.items() if s not in ("200", "503")),
        "ok_per_second": round(len(ok) / seconds, 1),
        "ok_latency_ms": {
            "p50": round(float(np.percentile(ok, 50)), 2),
            "p90": round(float(np.percentile(ok, 90)), 2),
            "p99": round(float(np.percentile(ok, 99)), 2),
            "max": round(float(ok.max()), 2),
        }
        if len(ok)
        else None,
        "busy_latency_ms_p50": round(float(np.percentile(busy, 50)), 2) if len(busy) else None,
    }


def _soak(port: int, body: bytes, pid: int, args: argparse.Namespace, idle_rss: float) -> dict:
    """The load for ``args.soak_seconds`` while the daemon's RSS is sampled every ``args.sample_seconds``."""
    samples: list[tuple[float, float]] = []
    began = time.monotonic()
    next_sample = [began]

    def sample() -> None:
        now = time.monotonic()
        if now >= next_sample[0]:
            samples.append((now - began, _rss_mb(pid)))
            next_sample[0] += args.sample_seconds

    soak = _run_load(port, body, args.concurrency, args.soak_seconds, on_tick=sample)
    t, rss = np.array(samples).T
    half = len(rss) // 2
    soak["rss_mb"] = {
        "idle_before_load": round(idle_rss, 1),
        "first": round(float(rss[0]), 1),
        "last": round(float(rss[-1]), 1),
        "peak": round(float(rss.max()), 1),
        "median_first_half": round(float(np.median(rss[:half])), 1),
        "median_second_half": round(float(np.median(rss[half:])), 1),
        "slope_mb_per_min": round(float(np.polyfit(t / 60, rss, 1)[0]), 3),
        "samples": [[round(a, 1), round(b, 1)] for a, b in samples],
    }
    return soak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the shipped headct-ich-int8)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--soak-seconds", type=float, default=600)
    parser.add_argument("--sample-seconds", type=float, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        body = _slice(work)
        port = _free_port()
        command = [sys.executable, "-m", "edgedx", "serve", "--out", str(work / "out"), "--http-port", str(port)]
        command += ["--workers", str(args.workers), "--queue-size", str(args.queue_size)]
        command += ["--bundle", str(args.bundle)] if args.bundle else []
        log = open(work / "daemon.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while b"ready:" not in (work / "daemon.log").read_bytes():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / "daemon.log").read_text())
                time.sleep(0.1)
            idle_rss = _rss_mb(daemon.pid)
            _run_load(port, body, args.concurrency, 5)  # warm-up, not reported
            print(f"load: {args.concurrency} clients for {args.seconds:g} s ...", flush=True)
            cpu_before = _cpu_seconds(daemon.pid)
            load = _run_load(port, body, args.concurrency, args.seconds)
            # the daemon's own work per answer, whatever the clients on the same cores cost
            cpu_ms = (_cpu_seconds(daemon.pid) - cpu_before) * 1e3
            load["daemon_cpu_ms_per_request"] = round(cpu_ms / load["requests"], 2)
            print(json.dumps(load, indent=1), flush=True)
            soak = None
            if args.soak_seconds > 0:
                print(f"soak: {args.soak_seconds:g} s, RSS every {args.sample_seconds:g} s ...", flush=True)
                soak = _soak(port, body, daemon.pid, args, idle_rss)
                print(json.dumps({k: v for k, v in soak.items() if k != "rss_mb"}, indent=1))
                print(json.dumps({k: v for k, v in soak["rss_mb"].items() if k != "samples"}, indent=1), flush=True)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(120)
            log.close()
        drained = "queue drained" in (work / "daemon.log").read_text()
    record = {
        "cores": os.cpu_count(),
        "workers": args.workers,
        "queue_size": args.queue_size,
        "bundle": str(args.bundle or "models/headct-ich-int8"),
        "body_bytes": len(body),
        "load": load,
        "soak": soak,
        "sigterm_exit_code": code,
        "drained": drained,
    }
    out = HERE / "results" / f"serve-load-cpu{os.cpu_count()}-c{args.concurrency}-q{args.queue_size}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"exit code after SIGTERM {code}, drained: {drained}; written {out}")


if __name__ == "__main__":
    main()
