"""Start the real `bentoml serve` in a subprocess: for end-to-end tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BENTOML = Path(sys.executable).parent / "bentoml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `bentoml serve` process; ``url`` is its base address."""

    def __init__(self, model: Path | str | None, log_path: Path, target: str = "service:GLM4V", **env: str) -> None:
        """``model=None`` leaves GLM4V_MODEL unset (a built Bento names its own model)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "True", **env}
        environment.pop("GLM4V_MODEL", None)
        if model is not None:
            environment["GLM4V_MODEL"] = str(model)
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [str(BENTOML), "serve", target, "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=REPO,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> Server:
        """``with Server(...) as server:`` waits until it is ready and stops it afterwards."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_listening(self, timeout: float = 120.0) -> None:
        self._wait(lambda response: True, timeout, "answer HTTP")

    def wait_ready(self, timeout: float = 120.0) -> None:
        self._wait(lambda response: response.status_code == 200, timeout, "report ready")

    def _wait(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if done(httpx.get(f"{self.url}/readyz", timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server did not {what} within {timeout:.0f} s:\n{self.log()}")

    def failed_start_log(self, timeout: float = 120.0) -> str:
        """For a server that should stop while starting: its log once it has exited."""
        try:
            self.wait_ready(timeout)
            started = True
        except RuntimeError:  # the process exited
            started = False
        log = self.log()
        self.stop()
        if started or self.process.returncode == 0:
            raise AssertionError(f"bentoml serve did not fail (exit status {self.process.returncode}):\n{log}")
        return log

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._log.close()
