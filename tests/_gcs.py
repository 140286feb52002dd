"""A GCS emulator on 127.0.0.1 for the tests, with the fault-injecting proxy of tests/_s3.py in front.

gcp-storage-emulator (pure Python, in a thread of this process) answers the GCS JSON API that gcsfs speaks: object
metadata and listings, ranged media downloads, simple, multipart and resumable uploads, deletes. gcsfs goes to it
through STORAGE_EMULATOR_HOST (read on every request) with token="anon" from fsspec's config (FSSPEC_GS_TOKEN for
child processes, fsspec.config.conf in this one): no Google credential is looked up, so neither the metadata server
nor gcloud's files are asked; NO_GCE_CHECK and GCE_METADATA_* point google-auth away from them besides. `loopback`
records every address this process connects to or resolves while a session is open, so a test can check that no
request left 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from _s3 import FaultProxy

UNSET = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "GCSFS_DEFAULT_PROJECT",
         "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "FSSPEC_CONFIG_DIR")

_seen: list[str] | None = None  # while a session is open: hosts this process connected to or looked up


def _audit(event: str, args: tuple) -> None:
    if _seen is None:
        return
    if event == "socket.connect" and isinstance(args[1], tuple):
        _seen.append(str(args[1][0]))
    elif event == "socket.getaddrinfo":
        _seen.append(str(args[0]))


sys.addaudithook(_audit)  # stays for the process (audit hooks cannot be removed); records only inside a session


def reached_hosts() -> list[str]:
    """The hosts this process connected to or looked up since the session opened."""
    return sorted(set(_seen or []))


def gcs_env(endpoint: str) -> dict[str, str]:
    """Environment for gcsfs and google-auth (set it, and remove UNSET): the emulator, anonymous access, no gcloud
    config, no metadata server, no proxies."""
    return {"STORAGE_EMULATOR_HOST": endpoint, "FSSPEC_GS_TOKEN": "anon", "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
            "CLOUDSDK_CONFIG": "/nonexistent/gcloud", "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost"}


@contextmanager
def gcs_session(bucket: str) -> Iterator[FaultProxy]:
    """The emulator with a FaultProxy in front, `bucket` made in it, this process's environment and fsspec config
    pointed at it for the duration (restored after); yields the proxy (its .url is the endpoint)."""
    import fsspec.config
    import pytest
    from gcp_storage_emulator.server import create_server

    global _seen
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)  # its request log
    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    server.start()
    proxy = FaultProxy(server._api._httpd.server_address)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            for key in UNSET:
                monkeypatch.delenv(key, raising=False)
            for key, value in gcs_env(proxy.url).items():
                monkeypatch.setenv(key, value)
            monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})  # fsspec read FSSPEC_* at import
            _seen = []
            yield proxy
    finally:
        _seen = None
        proxy.closing.set()
        proxy.shutdown()
        proxy.server_close()
        server.stop()
        with contextlib.suppress(ImportError):
            import gcsfs.core

            gcsfs.core.GCSFileSystem.clear_instance_cache()  # instances remember their session to this server

