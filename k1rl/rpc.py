"""Request-reply RPC between k1rl services: ZMQ ROUTER (server) / DEALER (client), msgpack.

Wire format, one msgpack frame each way:

    request  {"id": <uuid hex>, "method": <str>, "payload": <dict>}
    reply    {"id": <same id>, "ok": <bool>, "payload": <dict>}

Payloads are pydantic models dumped to plain dicts. A failed call's payload is a
``k1rl.protocol.ErrorReply``; the client re-raises it as a typed :class:`RemoteError`.
Every request gets a reply, even garbage: a frame too broken to carry an id is answered
with id ``""``, so a misbehaving peer learns what was wrong instead of timing out.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from k1rl.auth import CURVE_KEYS_ENV, CurveKeys, curve_keys, endpoint_is_local
from k1rl.metrics import prometheus
from k1rl.protocol import ErrorReply, Ping, Pong

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
Handler = Callable[[Any], BaseModel]

# error_type values produced by the transport itself; a handler failure carries the
# class name of the handler's exception instead.
MALFORMED_FRAME = "MalformedFrame"
UNKNOWN_METHOD = "UnknownMethod"
VALIDATION_ERROR = "ValidationError"


# ------------------------------------------------------------------------ errors


class RPCError(Exception):
    """Base of every error raised by this module."""


class RPCTimeout(RPCError, TimeoutError):
    """No reply (or no connection to the server) within the call's timeout."""


class RequestTooLargeError(RPCError):
    """The request frame is larger than the server accepts (it would drop the connection)."""


class InvalidReplyError(RPCError):
    """The server answered ok, but the payload does not fit the expected response model."""


class RemoteError(RPCError):
    """A call failed on the server; ``error_type`` is the remote exception's class name.
    The server's traceback stays in the server's log: a caller learns what failed, not
    the server's code paths."""

    def __init__(self, error_type: str, message: str) -> None:
        # both in args so the exception survives pickling (e.g. across processes)
        super().__init__(error_type, message)
        self.error_type = error_type
        self.message = message

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"

    @staticmethod
    def from_payload(payload: dict[str, Any]) -> RemoteError:
        """The typed exception for an ErrorReply payload (the subclass picked by error_type)."""
        try:
            err = ErrorReply.model_validate(payload)
        except ValidationError:
            return RemoteError("BadErrorReply", f"unreadable error reply: {payload!r}")
        cls = _REMOTE_ERROR_CLASSES.get(err.error_type, RemoteError)
        return cls(err.error_type, err.message)


class RemoteValidationError(RemoteError):
    """The request payload failed validation against the method's request model."""


class UnknownMethodError(RemoteError):
    """The server has no handler registered under the requested method name."""


class MalformedFrameError(RemoteError):
    """The server could not decode the request frame or its envelope."""


_REMOTE_ERROR_CLASSES: dict[str, type[RemoteError]] = {
    VALIDATION_ERROR: RemoteValidationError,
    UNKNOWN_METHOD: UnknownMethodError,
    MALFORMED_FRAME: MalformedFrameError,
}


# ---------------------------------------------------------------------- envelopes


class _Envelope(BaseModel):
    # strict: an id of 5 or a method of b"x" is a broken peer, not something to coerce
    model_config = ConfigDict(extra="forbid", strict=True)


class RequestEnvelope(_Envelope):
    id: str = Field(max_length=64)
    method: str = Field(min_length=1, max_length=128)
    payload: dict[str, Any]


class ReplyEnvelope(_Envelope):
    id: str
    ok: bool
    payload: dict[str, Any]


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False)


def _dump(model: BaseModel) -> dict[str, Any]:
    # python mode, not json: msgpack carries bytes and NaN/inf natively, whereas the json
    # mode would turn a NaN loss into null and make the reply fail validation.
    return model.model_dump(mode="python")


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``field.path: message (got value)``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = repr(err.get("input"))
        if len(got) > 80:
            got = got[:77] + "..."
        parts.append(f"{loc}: {err['msg']} (got {got})")
    return "; ".join(parts)


def _error_frame(req_id: str, error_type: str, message: str) -> bytes:
    err = ErrorReply(error_type=error_type, message=message)
    return _pack({"id": req_id, "ok": False, "payload": err.model_dump()})


# ------------------------------------------------------------------------- server


@dataclass
class _Route:
    request_model: type[BaseModel]
    handler: Handler
    inline: bool


@dataclass
class _Job:
    prefix: list[bytes]  # routing frames: the client identity (+ "" delimiter for REQ peers)
    req_id: str
    method: str
    payload: dict[str, Any]


class RPCServer:
    """A service's RPC endpoint: typed handlers registered by method name.

    Threading design: the ROUTER socket is touched only by the loop thread (ZMQ sockets
    are not thread-safe). Handlers run one at a time on a single worker thread, because a
    service drives one engine (a trainer, a vLLM instance) that must not be entered twice;
    a service whose handlers are thread-safe (the sandbox's pool of worker processes)
    asks for ``handler_threads`` > 1 to serve that many requests at once.
    Keeping them off the loop thread is what lets ``ping`` — and methods registered with
    ``inline=True``, such as an abort — be answered while a long generate or train step
    runs. The worker hands each finished reply to the loop through an inproc PUSH/PULL
    pair, so the ROUTER is never shared between threads.

    Bind happens in the constructor, so ``address`` (the real port when port 0 or ``*`` is
    given) is known before serving starts and a port clash fails at construction.
    """

    # how often the loop wakes to notice stop(); bounds stop() latency, costs nothing
    POLL_MS = 50

    def __init__(self, address: str, service: str, *, ready: bool = True,
                 handler_threads: int = 1, max_message_bytes: int | None = None,
                 metrics_port: int | None = None) -> None:
        if handler_threads < 1:
            raise ValueError(f"handler_threads must be >= 1, got {handler_threads}")
        self.service = service
        self._handler_threads = handler_threads
        keys = curve_keys()
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.linger = 0
        if max_message_bytes is not None:
            # ZMQ drops the connection of a peer whose frame is larger, before anything
            # is buffered or decoded here: ping and other callers are served on
            self._router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._authenticator = None if keys is None else self._require_curve(keys)
        try:
            self._router.bind(address)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise ValueError(f"service {service!r} cannot bind {address!r}: {e}") from e
        if keys is None and not endpoint_is_local(address):
            self._close_sockets()  # bound, but nothing was read
            raise ValueError(
                f"service {service!r} would serve {address!r} to other machines without "
                f"authentication: set {CURVE_KEYS_ENV} to the run's keys directory (`k1rl keys "
                "create DIR`), or bind a loopback address")
        self.address: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("%s: serving %s on %s", service,
                 "CURVE-authenticated" if keys else "plain, unauthenticated (loopback only)",
                 self.address)
        # the port /metrics is served on (the real one when 0 was asked), or None
        self.metrics_port = None if metrics_port is None else prometheus.serve(metrics_port)
        if self.metrics_port is not None:
            log.info("%s: Prometheus /metrics on port %d", service, self.metrics_port)
        self._replies_ep = f"inproc://k1rl-rpc-replies-{uuid.uuid4().hex}"
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.linger = 0
        self._replies.bind(self._replies_ep)
        self._routes: dict[str, _Route] = {}
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._closed = False
        self._started_at = time.monotonic()
        self._instance = uuid.uuid4().hex
        self._ready = ready
        self._detail: dict[str, str | int | float | bool] = {}
        if max_message_bytes is not None:
            self._detail["max_message_bytes"] = max_message_bytes
        # methods running on handler threads now (several threads may run at once)
        self._busy: collections.Counter[str] = collections.Counter()
        self._busy_lock = threading.Lock()
        self._loop_thread: threading.Thread | None = None
        self.register("ping", Ping, self._ping, inline=True)

    # ---------------------------------------------------------------- public API

    @property
    def port(self) -> int:
        """The bound TCP port (useful after binding port 0)."""
        return int(self.address.rsplit(":", 1)[1])

    @property
    def ready(self) -> bool:
        return self._ready

    def set_ready(self, ready: bool, **detail: str | int | float | bool) -> None:
        """Set the ``ready`` flag reported by ping, and merge ``detail`` into its detail dict."""
        self._ready = ready
        self.set_detail(**detail)

    def set_detail(self, **detail: str | int | float | bool) -> None:
        """Merge ``detail`` into what ping reports (e.g. the policy version held)."""
        self._detail.update(detail)

    def register(
        self,
        method: str,
        request_model: type[BaseModel],
        handler: Handler,
        *,
        inline: bool = False,
    ) -> None:
        """Serve ``method``: its payload is validated as ``request_model`` and passed to
        ``handler``, whose returned pydantic model becomes the reply.

        ``inline=True`` runs the handler on the loop thread, so it is answered even while
        another handler is busy; use it only for quick, thread-safe handlers (status, abort).
        """
        if not method:
            raise ValueError("method name must be non-empty")
        if method in self._routes:
            raise ValueError(f"method {method!r} is already registered on {self.service!r}")
        if not (isinstance(request_model, type) and issubclass(request_model, BaseModel)):
            raise TypeError(f"request_model for {method!r} must be a pydantic model class")
        self._routes[method] = _Route(request_model, handler, inline)

    def start_in_thread(self) -> RPCServer:
        """Serve on a daemon thread; returns self for ``with RPCServer(...).start_in_thread()``."""
        if self._loop_thread is not None:
            raise RuntimeError(f"RPC server {self.service!r} is already started")
        self._loop_thread = threading.Thread(
            target=self.serve_forever, name=f"{self.service}-rpc", daemon=True
        )
        self._loop_thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread until :meth:`stop`; closes the sockets on exit."""
        if self._closed:
            raise RuntimeError(f"RPC server {self.service!r} is closed")
        if self._loop_thread is None:
            # serving on the caller's thread: stop() from elsewhere must join, not close
            self._loop_thread = threading.current_thread()
        for i in range(self._handler_threads):
            name = f"{self.service}-rpc-worker" + (f"-{i}" if self._handler_threads > 1 else "")
            threading.Thread(target=self._work, name=name, daemon=True).start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self.POLL_MS))
                if self._replies in events:
                    self._router.send_multipart(self._replies.recv_multipart())
                if self._router in events:
                    frames = self._router.recv_multipart()
                    try:
                        self._on_request(frames)
                    except Exception:  # a bug here must not take the service down
                        log.exception("%s: failed to handle a request", self.service)
        finally:
            for _ in range(self._handler_threads):
                self._jobs.put(None)
            self._close()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving. A handler still running is not interrupted; its reply is dropped."""
        self._stop.set()
        thread = self._loop_thread
        if thread is None:
            self._close()  # never served: nothing else owns the sockets
        elif thread is not threading.current_thread():
            thread.join(timeout_s)

    def __enter__(self) -> RPCServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------- loop thread

    def _on_request(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        prefix = [identity]
        # a REQ peer puts an empty delimiter before the body and expects it back
        if len(rest) == 2 and rest[0] == b"":
            prefix.append(b"")
            rest = rest[1:]
        if len(rest) != 1:
            msg = f"expected exactly one message frame, got {len(rest)}"
            self._router.send_multipart([*prefix, _error_frame("", MALFORMED_FRAME, msg)])
            return
        job_or_error = self._parse(prefix, rest[0])
        if isinstance(job_or_error, bytes):
            self._router.send_multipart([*prefix, job_or_error])
        elif self._routes[job_or_error.method].inline:
            self._router.send_multipart([*prefix, self._run(job_or_error)])
        else:
            self._jobs.put(job_or_error)
            prometheus.RPC_QUEUED.labels(self.service).set(self._jobs.qsize())

    def _parse(self, prefix: list[bytes], body: bytes) -> _Job | bytes:
        """The job a request frame asks for, or the error reply frame explaining why not."""
        try:
            obj = _unpack(body)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            msg = f"request is not a msgpack frame ({type(e).__name__}: {e})"
            return _error_frame("", MALFORMED_FRAME, msg)
        # answer with the caller's id whenever one is readable, so it can match the reply
        req_id = obj.get("id") if isinstance(obj, dict) else None
        req_id = req_id if isinstance(req_id, str) else ""
        try:
            env = RequestEnvelope.model_validate(obj)
        except ValidationError as e:
            msg = f"bad request envelope: {describe_validation_error(e)}"
            return _error_frame(req_id, MALFORMED_FRAME, msg)
        if env.method not in self._routes:
            known = ", ".join(sorted(self._routes))
            msg = f"service {self.service!r} has no method {env.method!r} (known: {known})"
            return _error_frame(env.id, UNKNOWN_METHOD, msg)
        return _Job(prefix, env.id, env.method, env.payload)

    def _ping(self, _: Ping) -> Pong:
        detail = dict(self._detail)
        with self._busy_lock:
            detail["busy"] = ", ".join(sorted(m for m, k in self._busy.items() if k > 0))
        detail["queued"] = self._jobs.qsize()
        return Pong(
            service=self.service,
            pid=os.getpid(),
            instance=self._instance,
            uptime_s=time.monotonic() - self._started_at,
            ready=self._ready,
            detail=detail,
        )

    def _require_curve(self, keys: CurveKeys):
        """CURVE on the ROUTER: encrypted, and a ZAP handler admitting only the public
        certificates in the keys directory (a peer without the run's secret cannot even
        complete the handshake, so it is never read)."""
        from zmq.auth.thread import ThreadAuthenticator

        authenticator = ThreadAuthenticator(self._ctx, log=log.getChild("zap"))
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(keys.directory))
        self._router.curve_secretkey = keys.secret
        self._router.curve_publickey = keys.public
        self._router.curve_server = True
        return authenticator

    def _close_sockets(self) -> None:
        self._router.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._ctx.term()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._replies.close(linger=0)
        self._close_sockets()

    # ------------------------------------------------------------- worker thread

    def _run(self, job: _Job) -> bytes:
        """Validate, call the handler, and encode the reply frame (never raises)."""
        started = time.perf_counter()
        frame, outcome = self._answer(job)
        if job.method != "ping":  # probes would drown the service's own traffic
            prometheus.RPC_REQUESTS.labels(self.service, job.method, outcome).inc()
            prometheus.RPC_SECONDS.labels(self.service, job.method).observe(
                time.perf_counter() - started)
        return frame

    def _answer(self, job: _Job) -> tuple[bytes, str]:
        """The reply frame and its outcome: ok, invalid (the request), error (the handler)."""
        route = self._routes[job.method]
        try:
            request = route.request_model.model_validate(job.payload)
        except ValidationError as e:
            model = route.request_model.__name__
            msg = f"invalid payload for {job.method!r} ({model}): {describe_validation_error(e)}"
            return _error_frame(job.req_id, VALIDATION_ERROR, msg), "invalid"
        try:
            result = route.handler(request)
            if not isinstance(result, BaseModel):
                raise TypeError(
                    f"handler of {job.method!r} returned {type(result).__name__}, "
                    "expected a pydantic model"
                )
            return _pack({"id": job.req_id, "ok": True, "payload": _dump(result)}), "ok"
        except Exception as e:
            log.warning("%s: handler of %r failed: %s", self.service, job.method,
                        traceback.format_exc())
            return _error_frame(job.req_id, type(e).__name__, str(e)), "error"

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            prometheus.RPC_QUEUED.labels(self.service).set(self._jobs.qsize())
            in_flight = prometheus.RPC_IN_FLIGHT.labels(self.service, job.method)
            with self._busy_lock:
                self._busy[job.method] += 1
            in_flight.inc()
            try:
                frame = self._run(job)
            finally:
                in_flight.dec()
                with self._busy_lock:
                    self._busy[job.method] -= 1
            self._send_from_worker([*job.prefix, frame])

    def _send_from_worker(self, frames: list[bytes]) -> None:
        # A short-lived socket per reply: the worker then never holds a socket while it
        # runs a handler, so closing the server never waits on a handler to finish.
        if self._stop.is_set():
            log.info("%s: server stopped, dropping a late reply", self.service)
            return
        try:
            sock = self._ctx.socket(zmq.PUSH)
        except zmq.ZMQError:  # context already terminated by stop()
            return
        try:
            sock.connect(self._replies_ep)
            sock.send_multipart(frames)
        finally:
            sock.close(linger=1000)


# ------------------------------------------------------------------------- client


class RPCClient:
    """Blocking client of one RPCServer.

    Use from one thread at a time: a DEALER socket is not thread-safe, so a second thread
    calling while a call is in flight gets a RuntimeError instead of interleaved frames.
    Create one client per thread if you need concurrency.

    A reply is matched to its request by id. After a timeout, the late reply of the
    abandoned request is recognised by its id and dropped when it eventually arrives.
    """

    def __init__(self, address: str, timeout_s: float = 30.0,
                 max_message_bytes: int | None = None) -> None:
        """``max_message_bytes``: the server's limit, so that a larger request fails here
        with its size instead of being dropped there and timing out."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 (math.inf to wait forever), got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.linger = 0
        keys = curve_keys()
        if keys is not None:  # the run's keypair is both this client's and the server's
            self._sock.curve_secretkey = keys.secret
            self._sock.curve_publickey = keys.public
            self._sock.curve_serverkey = keys.public
        # Queue requests only on completed connections: a request made while the server is
        # down then times out here instead of waiting in a buffer and running much later.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        try:
            self._sock.connect(address)
        except zmq.ZMQError as e:
            self._sock.close()
            raise ValueError(f"cannot connect RPC client to {address!r}: {e}") from e
        self._in_call = threading.Lock()
        self.stale_replies_dropped = 0

    def call(
        self,
        method: str,
        request: BaseModel,
        response_model: type[T],
        timeout_s: float | None = None,
    ) -> T:
        """Call ``method`` with ``request``; the reply validated as ``response_model``.

        Raises RPCTimeout, a RemoteError subclass for server-side failures, or
        InvalidReplyError if the reply does not fit ``response_model``.
        """
        if not isinstance(request, BaseModel):
            raise TypeError(f"request must be a pydantic model, got {type(request).__name__}")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        if self._sock.closed:
            raise RPCError(f"RPC client to {self.address} is closed")
        if not self._in_call.acquire(blocking=False):
            raise RuntimeError("RPCClient used from two threads at once; use one client per thread")
        try:
            payload = self._round_trip(method, _dump(request), timeout)
        finally:
            self._in_call.release()
        try:
            return response_model.model_validate(payload)
        except ValidationError as e:
            raise InvalidReplyError(
                f"reply to {method!r} from {self.address} is not a valid "
                f"{response_model.__name__}: {describe_validation_error(e)}"
            ) from e

    def ping(self, timeout_s: float | None = None) -> Pong:
        return self.call("ping", Ping(), Pong, timeout_s)

    def close(self) -> None:
        self._sock.close(linger=0)

    @property
    def closed(self) -> bool:
        return self._sock.closed

    def __enter__(self) -> RPCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _round_trip(self, method: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        req_id = uuid.uuid4().hex
        frame = _pack({"id": req_id, "method": method, "payload": payload})
        if self.max_message_bytes is not None and len(frame) > self.max_message_bytes:
            raise RequestTooLargeError(
                f"{method!r} request is {len(frame)} bytes; {self.address} accepts at most "
                f"{self.max_message_bytes} (max_message_mib of its config section)")
        while True:
            if not self._poll(zmq.POLLOUT, deadline):
                raise RPCTimeout(
                    f"{method!r}: no connection to {self.address} within {timeout:.3g} s"
                )
            try:
                self._sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:  # the connection dropped between poll and send
                continue
        while True:
            if not self._poll(zmq.POLLIN, deadline):
                raise RPCTimeout(f"{method!r}: no reply from {self.address} within {timeout:.3g} s")
            reply = self._read_reply()
            # id "" is the server saying it could not read our frame at all
            if reply is None or not (reply.id == req_id or (reply.id == "" and not reply.ok)):
                self.stale_replies_dropped += 1
                continue
            if reply.ok:
                return reply.payload
            raise RemoteError.from_payload(reply.payload)

    def _poll(self, event: int, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        timeout_ms = None if math.isinf(remaining) else max(1, int(remaining * 1000))
        return bool(self._sock.poll(timeout_ms, event))

    def _read_reply(self) -> ReplyEnvelope | None:
        frames = self._sock.recv_multipart()
        if len(frames) != 1:
            log.warning("dropping a %d-frame reply from %s", len(frames), self.address)
            return None
        try:
            return ReplyEnvelope.model_validate(_unpack(frames[0]))
        except Exception as e:
            log.warning("dropping an unreadable reply from %s: %s", self.address, e)
            return None


class ThreadLocalClients:
    """One :class:`RPCClient` per calling thread, all to one address.

    For callers that fan requests out over threads (an RPCClient serves one thread at
    a time): each thread gets its own client on first use; :meth:`close` closes all.
    """

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._clients: list[RPCClient] = []
        self._lock = threading.Lock()

    def get(self) -> RPCClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = RPCClient(self.address, timeout_s=self.timeout_s)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def call(self, method: str, request: BaseModel, response_model: type[T],
             timeout_s: float | None = None) -> T:
        return self.get().call(method, request, response_model, timeout_s)

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()


def wait_until_ready(
    address: str,
    timeout_s: float = 60.0,
    *,
    require_ready: bool = True,
    interval_s: float = 0.1,
    proc: Any = None,
) -> Pong:
    """Ping ``address`` until the service answers (and reports ready, unless
    ``require_ready=False``); returns its Pong.

    ``proc`` (a ``subprocess.Popen``) makes the wait fail fast if that process exits.
    Raises RPCTimeout when ``timeout_s`` passes, RuntimeError when ``proc`` died.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with RPCClient(address, timeout_s=max(timeout_s, 1e-3)) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"service process {proc.pid} exited with code {proc.returncode} "
                    f"before {address} became ready"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RPCTimeout(f"{address} not ready within {timeout_s:.3g} s ({last})")
            try:
                pong = client.ping(timeout_s=min(1.0, remaining))
            except RPCTimeout:
                continue  # each ping already waited; no extra sleep needed
            if pong.ready or not require_ready:
                return pong
            last = f"{pong.service} answers but is not ready: {pong.detail}"
            time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))

