"""llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`), run by openrlaif itself.

llama.cpp's server takes text prompts only, returns no token ids and has no endpoint that loads
new weights. For RL rollouts (`rollout_server: {reload: llama_cpp}`) openrlaif therefore runs the
server as a child process and reloads by restarting it on the policy written as a GGUF file
(`models.gguf.write_gguf`); the tests use the same class to start one on 127.0.0.1.

    with LlamaCppServer(port=8011, alias="policy", log=Path("server.log")) as server:
        server.start(Path("policy.gguf"))      # returns once /v1/models answers
        ...                                    # requests to server.base_url
        server.start(Path("policy-2.gguf"))    # a restart on new weights
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from openrlaif.errors import GenerationError


class LlamaCppServer:
    """One llama.cpp server process on `host:port`, answering to `alias` (the requests' `model`).
    `args` are more of `python -m llama_cpp.server`'s settings (e.g. `--n_ctx 2048`); its output
    goes to `log`. A server that exits or does not answer within `startup_timeout_s` is a one-line
    GenerationError quoting the log's last line."""

    def __init__(
        self, port: int, alias: str, log: Path, host: str = "127.0.0.1", args: Sequence[str] = (),
        startup_timeout_s: float = 180.0,
    ) -> None:  # fmt: skip
        self.host, self.port, self.alias, self.log = host, port, alias, log
        self.args, self.startup_timeout_s = list(args), startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, gguf: Path) -> None:
        """Serve `gguf` (a running server is stopped first); returns once it answers."""
        self.stop()
        try:
            import llama_cpp.server  # noqa: F401  # why: an optional package, only for this server
        except ImportError:
            raise GenerationError(
                "llama.cpp's server needs `pip install 'llama-cpp-python[server]'` (it compiles llama.cpp once)"
            ) from None
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", self.alias,
            "--host", self.host, "--port", str(self.port), *self.args,
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise GenerationError(
                    f"llama.cpp's server on port {self.port} exited (code {self.process.returncode}) "
                    f"serving {gguf}: {self._last_log_line()} (log: {self.log})"
                )
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise GenerationError(
                    f"llama.cpp's server on port {self.port} did not answer within {self.startup_timeout_s:g} s "
                    f"serving {gguf}: {self._last_log_line()} (log: {self.log})"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _last_log_line(self) -> str:
        lines = (
            self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            if self.log.exists()
            else []
        )
        return lines[-1] if lines else "no output"

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
