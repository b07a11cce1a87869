"""Serve the sandbox: ZMQ (k1rl.rpc, method ``run_code``) and a JSON HTTP API.

HTTP, for tools outside k1rl:
    POST /run_code   body: a RunCodeRequest as JSON (``kind`` may be omitted)
                     200 + RunCodeResult; 400 + {"error": ...} for a bad request
                     or a body in SandboxFusion's schema (``code``, no ``source``):
                     answered in SandboxFusion's shape (sandbox/fusion.py)
    GET  /health     200 + {"ready": true, "workers": N, "runner": ..., "cgroups": ...}
    GET  /v1/ping    200 + "pong" (SandboxFusion's health check)
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydantic import ValidationError

from k1rl.auth import bearer_ok, read_secret
from k1rl.config import SandboxConfig
from k1rl.protocol import RunCodeRequest, RunCodeResult
from k1rl.rpc import RPCServer
from k1rl.service import run_until_signalled

from sandbox.pool import WorkerPool

log = logging.getLogger(__name__)
MAX_BODY = 80 << 20


class SandboxService:
    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.pool = WorkerPool(cfg)

    def run_code(self, req: RunCodeRequest) -> RunCodeResult:
        return self.pool.run(req)

    def run_fusion(self, payload: dict) -> tuple[int, dict]:
        """(HTTP status, body) for a request in SandboxFusion's schema (sandbox/fusion.py):
        422 for a request it would refuse too, else 200 with the outcome."""
        from sandbox.fusion import FusionRequest, FusionResponse, fusion_response, native_request
        from sandbox.languages import LANGUAGES

        try:
            req = FusionRequest.model_validate(payload)
        except ValidationError as e:
            return 422, {"detail": json.loads(e.json())}
        native = native_request(req, {lang.name for lang in LANGUAGES.values()})
        if isinstance(native, str):
            return 200, FusionResponse(status="SandboxError", message=native).model_dump()
        try:
            result = self.run_code(native)
        except Exception as e:  # noqa: BLE001 - SandboxFusion answers any failure this way
            log.exception("run_code (SandboxFusion schema) failed")
            return 200, FusionResponse(status="SandboxError",
                                       message=f"{type(e).__name__}: {e}").model_dump()
        return 200, fusion_response(result).model_dump()

    def health(self) -> dict:
        return {"ready": True, "workers": self.cfg.workers, "runner": self.cfg.runner,
                "cgroups": self.pool.cgroups, "worker_restarts": self.pool.restarts}

    def close(self) -> None:
        self.pool.close()


def _http_handler(service: SandboxService, token: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # route to logging, not stderr
            log.debug("http %s: " + fmt, self.client_address[0], *args)

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, service.health())
            elif self.path == "/v1/ping":  # SandboxFusion's health check
                self._reply(200, "pong")
            else:
                self._reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self):
            if self.path != "/run_code":
                self._reply(404, {"error": f"no such endpoint: POST {self.path}"})
                return
            if token is not None and not bearer_ok(self.headers.get("Authorization"), token):
                self.close_connection = True  # the body is never read
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="k1rl-sandbox"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._reply(411, {"error": "Content-Length required"})
                return
            if length > MAX_BODY:
                self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
                return
            raw = self.rfile.read(length)
            try:
                payload = json.loads(raw)
            except json.JSONDecodeError as e:
                self._reply(400, {"error": f"body is not JSON: {e}"})
                return
            if isinstance(payload, dict) and "code" in payload and "source" not in payload:
                self._reply(*service.run_fusion(payload))  # SandboxFusion's schema
                return
            try:
                if isinstance(payload, dict):
                    payload.setdefault("kind", "run_code")
                req = RunCodeRequest.model_validate(payload)
                result = service.run_code(req)
            except ValidationError as e:
                self._reply(400, {"error": "invalid request", "details": json.loads(e.json())})
            except ValueError as e:
                self._reply(400, {"error": str(e)})
            else:
                self._reply(200, result.model_dump())

    return Handler


class Servers:
    """The running endpoints; ``http_port`` is the real port (after binding 0)."""

    def __init__(self, cfg: SandboxConfig, address: str | None = None) -> None:
        self.service = SandboxService(cfg)
        self.rpc = RPCServer(address or cfg.address, service="sandbox",
                             handler_threads=cfg.workers,
                             max_message_bytes=cfg.max_message_bytes,
                             metrics_port=cfg.metrics_port)
        self.rpc.register("run_code", RunCodeRequest, self.service.run_code)
        self.http: ThreadingHTTPServer | None = None
        if cfg.http_port is not None:
            token = (None if cfg.http_token_file is None
                     else read_secret(cfg.http_token_file, "sandbox.http_token_file"))
            self.http = ThreadingHTTPServer((cfg.http_host, cfg.http_port),
                                            _http_handler(self.service, token))
            log.info("sandbox HTTP API on %s:%d: %s", cfg.http_host, self.http.server_port,
                     "bearer token required" if token else
                     "no authentication (loopback only)")
            self.http.daemon_threads = True
        self.rpc.set_ready(True, **{k: v for k, v in self.service.health().items()
                                    if k != "ready"})

    @property
    def http_port(self) -> int | None:
        return self.http.server_address[1] if self.http else None

    def start(self) -> Servers:
        self.rpc.start_in_thread()
        if self.http:
            threading.Thread(target=self.http.serve_forever, name="sandbox-http",
                             daemon=True).start()
        return self

    def stop(self) -> None:
        self.rpc.stop()
        if self.http:
            self.http.shutdown()
            self.http.server_close()
        self.service.close()


def serve(cfg: SandboxConfig, *, address: str | None = None) -> None:
    servers = Servers(cfg, address).start()
    log.info("sandbox ready: zmq %s, http %s, %d workers (%s runner, cgroups %s)",
             servers.rpc.address, servers.http_port, cfg.workers, cfg.runner,
             servers.service.pool.cgroups)
    try:
        run_until_signalled(servers.rpc)
    finally:
        servers.stop()
