"""k1rl.rpc: typed request-reply over ZMQ that survives slow handlers and garbage input."""

import socket
import threading
import time

import msgpack
import pytest
import zmq
from pydantic import BaseModel, Field

from k1rl.protocol import Pong
from k1rl.rpc import (
    MalformedFrameError,
    RemoteError,
    RemoteValidationError,
    RequestTooLargeError,
    RPCClient,
    RPCServer,
    RPCTimeout,
    ThreadLocalClients,
    UnknownMethodError,
    wait_until_ready,
)


class EchoRequest(BaseModel):
    text: str
    times: int = Field(1, ge=0)


class EchoReply(BaseModel):
    text: str
    handled_by: str


class SleepRequest(BaseModel):
    seconds: float
    tag: str


class BadEchoRequest(BaseModel):
    text: str
    times: str


class QuotaExceeded(Exception):
    pass


class Fixture:
    def __init__(self):
        self.slow_started = threading.Event()
        self.server = RPCServer("tcp://127.0.0.1:0", "test-svc")
        self.server.register("echo", EchoRequest, self.echo)
        self.server.register("sleep", SleepRequest, self.sleep)
        self.server.register("fail", EchoRequest, self.fail)
        self.server.register("not_a_model", EchoRequest, lambda req: {"text": req.text})
        self.server.register("status", EchoRequest, self.echo, inline=True)

    def echo(self, req: EchoRequest) -> EchoReply:
        return EchoReply(text=req.text * req.times, handled_by=threading.current_thread().name)

    def sleep(self, req: SleepRequest) -> EchoReply:
        self.slow_started.set()
        time.sleep(req.seconds)
        return EchoReply(text=req.tag, handled_by=threading.current_thread().name)

    def fail(self, req: EchoRequest) -> EchoReply:
        raise QuotaExceeded(f"quota exceeded for {req.text!r}")


@pytest.fixture
def svc():
    fx = Fixture()
    fx.server.start_in_thread()
    yield fx
    fx.server.stop()


@pytest.fixture
def client(svc):
    with RPCClient(svc.server.address, timeout_s=5.0) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_typed_round_trip_on_a_random_port(svc, client):
    assert svc.server.address.startswith("tcp://127.0.0.1:") and svc.server.port > 0
    reply = client.call("echo", EchoRequest(text="ab", times=3), EchoReply)
    assert isinstance(reply, EchoReply)
    assert reply.text == "ababab"
    assert reply.handled_by == "test-svc-rpc-worker"


def test_ping_reports_service_state(svc, client):
    pong = client.ping()
    assert isinstance(pong, Pong)
    assert pong.service == "test-svc" and pong.ready is True and pong.uptime_s >= 0
    svc.server.set_ready(False, phase="loading")
    pong = client.ping()
    assert pong.ready is False and pong.detail["phase"] == "loading"


def test_timeout_then_next_call_gets_its_own_reply_not_the_stale_one(svc, client):
    with pytest.raises(RPCTimeout, match="'sleep': no reply"):
        client.call("sleep", SleepRequest(seconds=0.6, tag="stale"), EchoReply, timeout_s=0.2)
    # The echo is queued behind the slow handler, so the stale "stale" reply reaches the
    # client first, with a payload that also validates as EchoReply.
    reply = client.call("echo", EchoRequest(text="fresh"), EchoReply)
    assert reply.text == "fresh"
    assert client.stale_replies_dropped == 1


def test_handler_exception_is_reraised_typed_and_its_traceback_stays_in_the_server_log(
        client, caplog):
    with caplog.at_level("WARNING", logger="k1rl.rpc"):
        with pytest.raises(RemoteError) as info:
            client.call("fail", EchoRequest(text="x"), EchoReply)
    err = info.value
    assert type(err) is RemoteError
    assert err.error_type == "QuotaExceeded"
    assert err.message == "quota exceeded for 'x'"
    assert str(err) == "QuotaExceeded: quota exceeded for 'x'"  # no server code paths
    assert "Traceback" in caplog.text and ", in fail" in caplog.text
    assert client.call("echo", EchoRequest(text="ok"), EchoReply).text == "ok"


def test_an_oversized_frame_is_dropped_unread_and_the_service_serves_on():
    server = RPCServer("tcp://127.0.0.1:0", "small", max_message_bytes=4096)
    handled = []
    server.register("echo", EchoRequest, lambda r: handled.append(r) or EchoReply(
        text=r.text, handled_by=""))
    server.start_in_thread()
    try:
        with RPCClient(server.address, timeout_s=2.0) as blind:
            with pytest.raises(RPCTimeout):  # its connection was dropped: no reply comes
                blind.call("echo", EchoRequest(text="x" * 10_000), EchoReply, timeout_s=1.0)
            assert not handled
            # the same client, reconnected, and everyone else are served on
            assert blind.call("echo", EchoRequest(text="ok"), EchoReply).text == "ok"
        with RPCClient(server.address, timeout_s=2.0, max_message_bytes=4096) as told:
            with pytest.raises(RequestTooLargeError, match=r"'echo' request is \d+ bytes; "
                               r".* accepts at most 4096"):
                told.call("echo", EchoRequest(text="x" * 10_000), EchoReply)
            pong = told.ping()
            assert pong.ready and pong.detail["max_message_bytes"] == 4096
    finally:
        server.stop()


def test_handler_returning_a_non_model_is_a_remote_type_error(client):
    with pytest.raises(RemoteError) as info:
        client.call("not_a_model", EchoRequest(text="x"), EchoReply)
    assert info.value.error_type == "TypeError" and "expected a pydantic model" in str(info.value)


def test_payload_failing_validation_names_the_field(client):
    with pytest.raises(RemoteValidationError) as info:
        client.call("echo", BadEchoRequest(text="x", times="many"), EchoReply)
    assert info.value.error_type == "ValidationError"
    assert "EchoRequest" in info.value.message
    assert "times" in info.value.message and "'many'" in info.value.message


def test_unknown_method_lists_the_known_ones(client):
    with pytest.raises(UnknownMethodError) as info:
        client.call("train", EchoRequest(text="x"), EchoReply)
    assert "'train'" in info.value.message and "echo" in info.value.message


GARBAGE = [
    # (frames, expected reply id, phrase in the error message)
    ([b"\xc1\xc1 not msgpack at all"], "", "not a msgpack frame"),
    ([msgpack.packb([1, 2, 3])], "", "bad request envelope"),
    ([msgpack.packb({"id": "abc", "payload": {}})], "abc", "method"),
    ([msgpack.packb({"id": "p1", "method": "echo", "payload": "str"})], "p1", "payload"),
    ([msgpack.packb({"id": 5, "method": "echo", "payload": {}})], "", "id"),
    ([msgpack.packb({"id": "e", "method": "echo", "payload": {}, "x": 1})], "e", "x"),
    ([msgpack.packb({"id": "t", "method": "echo", "payload": {}}) + b"trailing"], "", "msgpack"),
    ([b"junk-1", b"junk-2", b"junk-3"], "", "exactly one message frame"),
    ([b"", b"", b""], "", "exactly one message frame"),
]


def test_malformed_frames_each_get_an_error_reply_and_the_server_survives(svc, client):
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(svc.server.address)
    try:
        for frames, want_id, phrase in GARBAGE:
            raw.send_multipart(frames)
            assert raw.poll(5000), f"no reply to {frames!r}"
            (reply_frame,) = raw.recv_multipart()
            reply = msgpack.unpackb(reply_frame)
            assert reply["ok"] is False and reply["id"] == want_id, frames
            assert reply["payload"]["error_type"] == "MalformedFrame", frames
            assert phrase in reply["payload"]["message"], (frames, reply)
    finally:
        raw.close()
    assert client.ping().service == "test-svc"
    assert client.call("echo", EchoRequest(text="still up"), EchoReply).text == "still up"


def test_error_reply_without_id_surfaces_as_malformed_frame_error():
    err = RemoteError.from_payload(
        {"kind": "error", "error_type": "MalformedFrame", "message": "m"}
    )
    assert isinstance(err, MalformedFrameError) and err.message == "m"


def test_req_socket_peers_are_answered_too(svc):
    raw = zmq.Context.instance().socket(zmq.REQ)
    raw.linger = 0
    raw.connect(svc.server.address)
    try:
        raw.send(msgpack.packb({"id": "r1", "method": "ping", "payload": {}}))
        assert raw.poll(5000)
        reply = msgpack.unpackb(raw.recv())
    finally:
        raw.close()
    assert reply["id"] == "r1" and reply["ok"] and reply["payload"]["service"] == "test-svc"


def test_ping_reports_a_method_busy_while_any_handler_thread_runs_it():
    """Two handler threads in one method: the one that finishes first must not make the
    service look idle while the other still works."""
    server = RPCServer("tcp://127.0.0.1:0", "two-threads", handler_threads=2)
    server.register("sleep", SleepRequest,
                    lambda r: (time.sleep(r.seconds), EchoReply(text=r.tag, handled_by=""))[1])
    server.start_in_thread()
    try:
        def call(seconds: float) -> None:
            with RPCClient(server.address, timeout_s=10) as c:
                c.call("sleep", SleepRequest(seconds=seconds, tag="t"), EchoReply)

        long = threading.Thread(target=call, args=(2.0,))
        long.start()
        call(0.3)  # returns while the long one still sleeps
        with RPCClient(server.address, timeout_s=1.0) as c:
            assert c.ping().detail["busy"] == "sleep"
        long.join(10)
        with RPCClient(server.address, timeout_s=1.0) as c:
            assert c.ping().detail["busy"] == ""
    finally:
        server.stop()


def test_ping_and_inline_methods_answer_while_a_long_handler_runs(svc):
    slow_reply = {}

    def slow_call():
        with RPCClient(svc.server.address, timeout_s=10) as c:
            slow_reply["r"] = c.call("sleep", SleepRequest(seconds=2.0, tag="slow"), EchoReply)

    caller = threading.Thread(target=slow_call)
    caller.start()
    assert svc.slow_started.wait(5)
    with RPCClient(svc.server.address, timeout_s=1.0) as other:
        t0 = time.monotonic()
        pong = other.ping()
        status = other.call("status", EchoRequest(text="s"), EchoReply)
        elapsed = time.monotonic() - t0
    assert pong.detail["busy"] == "sleep"
    assert status.text == "s" and status.handled_by == "test-svc-rpc"
    assert elapsed < 1.0  # not the 2 s the busy worker needs
    caller.join(10)
    assert slow_reply["r"].text == "slow"


def test_client_refuses_use_from_two_threads_at_once(svc, client):
    t = threading.Thread(
        target=lambda: client.call("sleep", SleepRequest(seconds=0.5, tag="a"), EchoReply)
    )
    t.start()
    assert svc.slow_started.wait(5)
    with pytest.raises(RuntimeError, match="two threads"):
        client.ping()
    t.join(5)
    assert client.ping().service == "test-svc"


def test_no_server_is_a_timeout_naming_the_address():
    address = f"tcp://127.0.0.1:{_free_port()}"
    with RPCClient(address, timeout_s=0.2) as c:
        with pytest.raises(RPCTimeout, match="no connection"):
            c.ping()


def test_wait_until_ready_waits_for_serving_and_for_the_ready_flag():
    server = RPCServer("tcp://127.0.0.1:0", "late-svc", ready=False)
    # bound but not serving yet: the wait must keep pinging until serving starts
    timer = threading.Timer(0.3, server.start_in_thread)
    timer.start()
    try:
        with pytest.raises(RPCTimeout, match="not ready"):
            wait_until_ready(server.address, timeout_s=1.0)
        server.set_ready(True)
        pong = wait_until_ready(server.address, timeout_s=2.0)
        assert pong.service == "late-svc" and pong.ready
    finally:
        timer.join()
        server.stop()


def test_bind_errors_name_the_address():
    with pytest.raises(ValueError, match="cannot bind 'http://x:1'"):
        RPCServer("http://x:1", "bad")
    with RPCServer("tcp://127.0.0.1:0", "first") as first:
        with pytest.raises(ValueError, match="cannot bind"):
            RPCServer(first.address, "second")


def test_thread_local_clients_give_each_thread_its_own_client(svc):
    clients = ThreadLocalClients(svc.server.address, timeout_s=5.0)
    mine = clients.get()
    assert clients.get() is mine
    theirs, replies = [], []

    def other_thread():
        theirs.append(clients.get())
        replies.append(clients.call("echo", EchoRequest(text="x", times=2), EchoReply).text)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert theirs[0] is not mine and replies == ["xx"]
    clients.close()
    assert mine.closed and theirs[0].closed


def test_a_field_beyond_its_limit_is_refused_naming_the_field():
    from k1rl.protocol import ReleaseWeights, SamplingSpec

    server = RPCServer("tcp://127.0.0.1:0", "limits")
    server.register("sample", SamplingSpec, lambda r: Pong(service="x", pid=0, uptime_s=0.0,
                                                            ready=True))
    server.register("release", ReleaseWeights, lambda r: r)
    server.start_in_thread()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.connect(server.address)
        for method, payload, field in (
                ("sample", {"max_tokens": 1 << 30}, "max_tokens"),
                ("release", {"version": 1, "receiver": "r" * 100_000}, "receiver")):
            sock.send(msgpack.packb({"id": "1", "method": method, "payload": payload}))
            reply = msgpack.unpackb(sock.recv())
            assert reply["ok"] is False
            assert reply["payload"]["error_type"] == "ValidationError"
            assert reply["payload"]["message"].split(": ", 1)[1].startswith(field)
    finally:
        sock.close(linger=0)
        server.stop()


@pytest.fixture
def run_keys(tmp_path, monkeypatch):
    from k1rl.auth import CURVE_KEYS_ENV, create_curve_keys

    keys = create_curve_keys(tmp_path / "keys")
    monkeypatch.setenv(CURVE_KEYS_ENV, str(keys))
    return keys


def _echo_server(address: str) -> RPCServer:
    server = RPCServer(address, "curve")
    server.register("echo", EchoRequest, lambda r: EchoReply(text=r.text, handled_by=""))
    return server.start_in_thread()


def test_with_run_keys_only_holders_of_the_run_secret_are_served(run_keys, tmp_path,
                                                                  monkeypatch):
    from k1rl.auth import CURVE_KEYS_ENV, create_curve_keys

    server = _echo_server("tcp://*:0")  # every interface: allowed once authenticated
    address = server.address.replace("0.0.0.0", "127.0.0.1")
    try:
        with RPCClient(address, timeout_s=5.0) as member:
            assert member.call("echo", EchoRequest(text="hi"), EchoReply).text == "hi"
        monkeypatch.delenv(CURVE_KEYS_ENV)
        with RPCClient(address, timeout_s=1.0) as plain:  # no CURVE: no handshake, no reply
            with pytest.raises(RPCTimeout):
                plain.ping()
        monkeypatch.setenv(CURVE_KEYS_ENV, str(create_curve_keys(tmp_path / "other")))
        with RPCClient(address, timeout_s=1.0) as stranger:  # another run's keypair
            with pytest.raises(RPCTimeout):
                stranger.ping()
        monkeypatch.setenv(CURVE_KEYS_ENV, str(run_keys))
        with RPCClient(address, timeout_s=5.0) as member:  # and the service serves on
            assert member.ping().ready
    finally:
        server.stop()


def test_without_keys_a_service_serves_loopback_only(monkeypatch):
    from k1rl.auth import CURVE_KEYS_ENV

    monkeypatch.delenv(CURVE_KEYS_ENV, raising=False)
    with pytest.raises(ValueError, match="would serve 'tcp://\\*:0' to other machines "
                                         "without authentication: set K1RL_CURVE_KEYS"):
        RPCServer("tcp://*:0", "exposed")
    _echo_server("tcp://127.0.0.1:0").stop()


def test_unreadable_run_keys_are_a_clear_error(tmp_path, monkeypatch):
    from k1rl.auth import CURVE_KEYS_ENV

    monkeypatch.setenv(CURVE_KEYS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read the run keypair .*k1rl keys create"):
        RPCClient("tcp://127.0.0.1:1")
