"""A real S3 HTTP API for tests: moto's server in a subprocess on a free loopback port.

Import the fixtures into a test module (``from tests.s3_server import s3_server, s3``):

- ``s3_server`` (module scope): the running :class:`MotoS3Server`; stopped by the finalizer,
  also when tests fail.
- ``s3`` (function scope): the same server with its state wiped, IAM auth off, and the process
  environment pointed at it (fake credentials, ``FEDESM_S3_ENDPOINT_URL``, no AWS config files,
  no instance metadata lookups), so boto3 never talks to real AWS.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Variables that could point boto3 somewhere else than the test server.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the server gets SIGTERM if the test process dies without running finalizers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class MotoS3Server:
    """``python -m moto.server`` on 127.0.0.1:<free port>, started and stopped explicitly."""

    def __init__(self, start_timeout: float = 30.0):
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3Server":
        last_error = None
        for _ in range(3):  # another process may grab the free port between probe and bind
            try:
                self._start_once()
                atexit.register(self.stop)
                return self
            except RuntimeError as exc:
                last_error = exc
                self.stop()
        raise RuntimeError(f"could not start moto server: {last_error}")

    def _start_once(self) -> None:
        self.port = free_port()
        self._log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)
        env = dict(os.environ)
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)  # auth is toggled at runtime via set_auth()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"moto server did not answer within {self.start_timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        try:
            return Path(self._log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def _post(self, path: str, body: bytes = b"") -> bytes:
        # text/plain: with urllib's default form content type Flask hides the body from moto.
        req = urllib.request.Request(
            f"{self.endpoint_url}{path}", data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def reset(self) -> None:
        """Forget every bucket, object, IAM user... (moto's /moto-api/reset)."""
        self._post("/moto-api/reset")

    def set_auth(self, enabled: bool) -> None:
        """Enforce IAM authentication (unknown access keys get InvalidAccessKeyId) or accept anything."""
        self._post("/moto-api/reset-auth", b"0" if enabled else b"inf")

    def __enter__(self) -> "MotoS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def point_env_at(monkeypatch: pytest.MonkeyPatch, server: MotoS3Server, tmp_path: Path) -> None:
    """Make boto3 in this process use ``server`` with fake credentials and no AWS config."""
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("FEDESM_S3_ENDPOINT_URL", server.endpoint_url)


@pytest.fixture(scope="module")
def s3_server():
    server = MotoS3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch, tmp_path_factory):
    s3_server.set_auth(False)
    s3_server.reset()
    point_env_at(monkeypatch, s3_server, tmp_path_factory.mktemp("aws-home"))
    yield s3_server
    s3_server.set_auth(False)
