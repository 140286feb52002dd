"""A real S3-compatible server on 127.0.0.1 for the tests and benchmarks/bench_loader.py, with a proxy in front that
adds latency, caps bandwidth or injects faults.

moto's standalone server (ThreadedMotoServer, as s3fs's own tests use) answers the S3 API in a thread of this process.
`FaultProxy` forwards every request to it and can, for requests whose path contains a given text: answer 503
SlowDown, answer 404 NoSuchKey, cut the connection (TCP reset) after half of the body, or never answer. The
environment of `s3_env` points botocore at the proxy with fake credentials and no instance metadata, so no request
leaves the machine.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PLANTED_SECRET = "planted-secret-9f3c1e7a-never-write-me"  # the secret key the tests look for in every output
REGION = "us-east-1"

_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
              '<RequestId>fault</RequestId></Error>')


@dataclass
class Fault:
    """`times` requests (method, path containing `match`) get `kind`: 503, 404, reset or hang."""

    kind: str
    match: str
    times: int = 1
    method: str = "GET"


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], latency: float = 0.0, rate: float | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.latency = latency  # seconds added before each answer
        self.rate = rate  # bytes/s of each answer's body, None: no cap
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self.signed = 0  # requests signed with the key id of s3_env: the credentials came from the environment
        self.lock = threading.Lock()
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.match in path:
                    fault.times -= 1
                    return fault.kind
        return None

    def note(self, method: str, path: str, what: str) -> None:
        with self.lock:
            self.seen.append((method, path, what))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _error(self, status: int, code: str) -> None:
        body = _ERROR_XML.format(code=code, message=code).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.getheaders(), data

    def _send(self, status: int, headers: list[tuple[str, str]], data: bytes, cut: bool = False) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut:  # half the body, then a TCP reset
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        rate = self.server.rate
        step = 64 * 1024
        for i in range(0, len(data), step):
            self.wfile.write(data[i:i + step])
            if rate:
                time.sleep(len(data[i:i + step]) / rate)

    def _proxy(self) -> None:
        body = self._body()
        kind = self.server.take_fault(self.command, self.path)
        if "Credential=explainer-test-key/" in self.headers.get("Authorization", ""):
            with self.server.lock:
                self.server.signed += 1
        self.server.note(self.command, self.path, kind or "ok")
        if self.server.latency:
            time.sleep(self.server.latency)
        if kind == "hang":
            self.server.closing.wait(120)
            self.close_connection = True
            return
        if kind == "503":
            return self._error(503, "SlowDown")
        if kind == "404":
            return self._error(404, "NoSuchKey")
        status, headers, data = self._forward(body)
        self._send(status, headers, data, cut=kind == "reset" and status < 300)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy


UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
         "https_proxy", "ALL_PROXY", "all_proxy", "FSSPEC_CONFIG_DIR")


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for botocore/s3fs (set it, and remove UNSET): the local endpoint, fake credentials (the secret
    planted), no config files, no instance metadata, no proxies: nothing leaves 127.0.0.1."""
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "explainer-test-key",
            "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials", "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost"}


def use_s3_env(environ, endpoint: str) -> None:
    """Point `environ` (os.environ or a monkeypatch-able mapping) at the local server."""
    for key in UNSET:
        environ.pop(key, None)
    environ.update(s3_env(endpoint))


@contextmanager
def s3_server(latency: float = 0.0, rate: float | None = None) -> Iterator[FaultProxy]:
    """moto on 127.0.0.1 with a FaultProxy in front; yields the proxy (its .url is the S3 endpoint)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint of an earlier server
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    proxy = FaultProxy(moto.get_host_and_port(), latency=latency, rate=rate)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.closing.set()
        proxy.shutdown()
        proxy.server_close()
        moto.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def moto_server(latency: float = 0.0) -> Iterator[str]:
    """moto on 127.0.0.1 without the proxy, each answer `latency` seconds late (a sleep, so no CPU): for
    benchmarks/bench_loader.py, which caps the bandwidth in the kernel instead. Yields the endpoint URL."""
    import s3fs
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    s3fs.S3FileSystem.clear_instance_cache()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    app = DomainDispatcherApplication(create_backend_app)

    def delayed(environ, start_response):
        time.sleep(latency)
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, delayed if latency else app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def s3_session() -> Iterator[FaultProxy]:
    """s3_server with this process's environment pointed at it for the duration (AWS_* variables and proxies it does
    not set removed, restored after)."""
    import os

    import pytest

    with s3_server() as proxy, pytest.MonkeyPatch.context() as monkeypatch:
        env: dict[str, str] = {}
        use_s3_env(env, proxy.url)
        for key in list(os.environ):
            if key not in env and (key.startswith("AWS_") or key.lower().endswith("_proxy")):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield proxy


def make_bucket(name: str) -> None:
    """Create a bucket through the environment's endpoint (s3_env must be in os.environ). moto keeps its buckets in
    this process, so a later server may already have it."""
    import s3fs

    with contextlib.suppress(FileExistsError):
        s3fs.S3FileSystem().mkdir(name)
