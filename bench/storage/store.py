"""Where a run's data lives: the storage regime (warm, cold, s3) and, for s3, the object store.

By default ``--storage s3`` starts moto's S3 server on loopback (moto is on PyPI, maintained, and
serves boto3, s3torchconnector and DALI's AWS SDK alike; it keeps objects in memory, so data is
uploaded once per bench command), puts the shaper in front of it, and stops both at exit.
``--s3-endpoint URL`` and the standard AWS environment point the run at a real bucket instead.
The session is handed to child processes (sweep steps, torchrun's ranks) through the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import UsageError

REGIMES = ("warm", "cold", "s3")
SESSION_ENV = "LOADERBENCH_S3_SESSION"  # set by the process that started the store, read by its children
LOOPBACK_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loaderbench", "AWS_SECRET_ACCESS_KEY": "loaderbench"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UsageError(f"{what} exited at start (code {proc.returncode})")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise UsageError(f"{what} did not answer at {url} within {limit_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_server(port: int | None = None, env: dict | None = None):
    """moto's S3 server on loopback: yields (its URL, its process)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise UsageError(
            "--storage s3 without --s3-endpoint needs moto: pip install 'loaderbench[s3]'"
        ) from None
    port = port or _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url + "/moto-api/", proc, "the loopback object store (moto)")
        yield url, proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def shaper(upstream: str, latency_ms: float = 0.0, mbps: float = 0.0):
    """The shaper (bench.storage.shaper) in front of ``upstream`` (http://host:port): yields its URL."""
    hostport = upstream.split("://", 1)[1].rstrip("/")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.storage.shaper", "--upstream", hostport]
        + ["--latency-ms", str(latency_ms), "--mbps", str(mbps)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        port = (proc.stdout.readline() or "").strip()
        if not port.isdigit():
            raise UsageError(f"the S3 shaper did not start (code {proc.poll()})")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def shaper_stats(url: str | None) -> dict | None:
    """The shaper's counters at ``url`` (requests, bytes), or None where no shaper is in front."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/__shaper__", timeout=5) as r:
            stats = json.loads(r.read())
        return stats if "requests" in stats else None
    except (OSError, ValueError):
        return None


def current() -> dict | None:
    """The S3 session this process runs in (started here or by a parent), or None."""
    raw = os.environ.get(SESSION_ENV)
    return json.loads(raw) if raw else None


@contextlib.contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def session(storage: str, endpoint: str | None, bucket: str, latency_ms: float, mbps: float):
    """The object store a ``--storage s3`` command reads from, for its whole life (every step of a
    sweep, every rank). Yields the session record (None for warm and cold)."""
    if storage not in REGIMES:
        raise UsageError(f"--storage must be one of {', '.join(REGIMES)}, got {storage!r}")
    if storage != "s3":
        if endpoint or latency_ms or mbps:
            raise UsageError("--s3-endpoint, --s3-latency-ms and --s3-mbps need --storage s3")
        yield None
        return
    if latency_ms < 0 or mbps < 0:
        raise UsageError("--s3-latency-ms and --s3-mbps must be >= 0")
    inherited = current()
    if (
        inherited is not None
        and (endpoint is None or endpoint == inherited["endpoint"])
        and ((latency_ms, mbps) == (inherited["latency_ms"], inherited["mbps"]))
    ):  # a parent process (a sweep, torchrun's launcher) runs this store
        yield inherited
        return
    with contextlib.ExitStack() as stack:
        creds = {}
        if endpoint is None:
            creds = {**LOOPBACK_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}
            endpoint, _ = stack.enter_context(moto_server())
            kind = "moto server on loopback (started by bench)"
        elif not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"--s3-endpoint {endpoint}: expected http://HOST:PORT or https://...")
        else:
            kind = "endpoint given with --s3-endpoint"
        url = endpoint
        if endpoint.startswith("http://"):  # the shaper counts requests; it cannot see into TLS
            url = stack.enter_context(shaper(endpoint, latency_ms, mbps))
        elif latency_ms or mbps:
            raise UsageError(
                "--s3-latency-ms / --s3-mbps shape only an http:// endpoint (such as a loopback store)"
            )
        record = {
            "store": kind,
            "endpoint": endpoint,
            "url": url,
            "bucket": bucket,
            "latency_ms": latency_ms,
            "mbps": mbps,
            "shaped": url != endpoint,
        }
        stack.enter_context(_environ(**creds, AWS_ENDPOINT_URL=url, **{SESSION_ENV: json.dumps(record)}))
        yield record
