"""Start and stop the real `linkid` binary for the contract tests.

Every server gets a free loopback port and its own temporary directory for
the database and the root key. Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVER_CONFIG = HERE / "linkid-test.toml"
SCHEMATHESIS_CONFIG = HERE / "schemathesis.toml"

STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 15.0
SCHEMATHESIS_TIMEOUT_S = 420

# Every operation, as schemathesis labels them, by operationId: read from
# the committed document (which the Rust suite holds byte-identical to the
# generated one), so a new operation needs no line here.
def _operations() -> dict[str, str]:
    document = json.loads((REPO_ROOT / "openapi" / "openapi.json").read_text())
    return {
        operation["operationId"]: f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "operationId" in operation
    }


OPERATIONS = _operations()


def linkid_binary() -> Path:
    """The binary under test: $LINKID_BIN, else target/debug/linkid (relative to the repo root)."""
    path = Path(os.environ.get("LINKID_BIN", "target/debug/linkid"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(
            f"linkid binary not found at {path}: run `cargo build` or set LINKID_BIN"
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    """The caller's environment without any LINKID_* or RUST_LOG that would
    change the configuration under test."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LINKID_") and key != "RUST_LOG"
    }


class LinkidServer:
    """One `linkid serve` process and the `linkid` commands that share its config.

    `key_file` is `auth.private_key_file`; `public_key` (text form
    "ed25519/<hex>") is `auth.public_key`, for tokens minted elsewhere.
    `extra_env` adds LINKID_* overrides of the config file. With `dev`, the
    process is `linkid dev --print-token` instead (its own data and key),
    and `admin_token` is the token its banner prints.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        key_file: Path,
        public_key: str | None = None,
        config: Path = SERVER_CONFIG,
        extra_env: dict[str, str] | None = None,
        dev: bool = False,
    ) -> None:
        self.binary = linkid_binary()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.key_file = key_file
        self.public_key = public_key
        self.extra_env = dict(extra_env or {})
        self.port = free_port()
        self.log_path = workdir / "server.log"
        self.dev = dev
        self.admin_token: str | None = None
        self.process: subprocess.Popen | None = None
        self.exit_code: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = base_env()
        env["LINKID_SERVER__ADDR"] = f"127.0.0.1:{self.port}"
        env["LINKID_DATABASE__PATH"] = str(self.workdir / "linkid.db")
        env["LINKID_AUTH__PRIVATE_KEY_FILE"] = str(self.key_file)
        if self.public_key is not None:
            env["LINKID_AUTH__PUBLIC_KEY"] = self.public_key
        env.update(self.extra_env)
        return env

    def command(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Runs `linkid --config <config> ARGS...` with this server's environment."""
        result = subprocess.run(
            [str(self.binary), "--config", str(self.config), *args],
            env=self.env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"linkid {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def mint(self, *args: str) -> str:
        """`linkid token mint ARGS...`: the token it prints."""
        token = self.command("token", "mint", *args).stdout.strip()
        if not token or "\n" in token:
            raise RuntimeError(f"linkid token mint printed {token!r}, not one token")
        return token

    def start(self) -> "LinkidServer":
        for attempt in range(3):
            log = open(self.log_path, "ab")
            try:
                self.process = subprocess.Popen(
                    [str(self.binary), "--config", str(self.config), *(["dev", "--print-token"] if self.dev else ["serve"])],
                    env=self.env(),
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                log.close()
            try:
                self._wait_until_healthy()
                if self.dev:
                    self.admin_token = self._printed_token()
                return self
            except _ExitedEarly:
                # Most likely the free port was taken in between: try another.
                self.process = None
                if attempt == 2:
                    raise RuntimeError(
                        f"linkid serve exited during start-up:\n{self.log_tail()}"
                    ) from None
                self.port = free_port()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _wait_until_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _ExitedEarly()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"linkid serve did not answer /healthz within {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}"
        )

    def _printed_token(self) -> str:
        """The admin token `linkid dev --print-token` printed (a `TOKEN=` line)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("TOKEN="):
                    return line.removeprefix("TOKEN=")
            time.sleep(0.05)
        raise RuntimeError(f"linkid dev printed no TOKEN= line:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (the server drains and exits 0), then SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return self.exit_code
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        self.exit_code = process.returncode
        return self.exit_code

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "LinkidServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ExitedEarly(Exception):
    pass


def run_schemathesis(location: str, token: str, reports: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the schemathesis CLI as README.md's recipe does (from the repository
    root, with schemathesis.toml and the token in LINKID_TOKEN), with `args`,
    its reports in `reports`; returns the process and its JSON report."""
    json_report = reports / f"{name}.json"
    for stale in reports.glob(f"{name}.*"):
        stale.unlink()
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(SCHEMATHESIS_CONFIG),
        "run", location,
        "--no-color",
        "--report", "json,ndjson,junit",
        "--report-json-path", str(json_report),
        "--report-ndjson-path", str(reports / f"{name}.ndjson"),
        "--report-junit-path", str(reports / f"{name}.junit.xml"),
        *args,
    ]
    env = base_env()
    env["LINKID_TOKEN"] = token
    env.pop("SCHEMATHESIS_HOOKS", None)  # schemathesis.toml names the hooks
    # Hypothesis keeps its character tables under .hypothesis/ in the
    # working directory; here they go with the reports.
    env["HYPOTHESIS_STORAGE_DIRECTORY"] = str(reports / ".hypothesis")
    env["COLUMNS"] = "160"
    result = subprocess.run(
        command,
        env=env,
        cwd=REPO_ROOT,  # where the config's hooks path starts; nothing is written there
        capture_output=True,
        text=True,
        timeout=SCHEMATHESIS_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    (reports / f"{name}.out").write_text(result.stdout + result.stderr)
    if not json_report.is_file():
        pytest.fail(f"schemathesis wrote no report (exit {result.returncode}):\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return result, json.loads(json_report.read_text())
