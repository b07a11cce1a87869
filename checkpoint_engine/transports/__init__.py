"""Weight transports, registered by name.

``get_sender(name, **opts)`` / ``get_receiver(name, **opts)`` build one end of a
transport; the options are the keyword arguments of its classes. Built in: "mooncake"
(Mooncake transfer engine, TCP or RDMA) and "shm" (POSIX shared memory). GPU transports
(NCCL broadcast, CUDA IPC) subclass the same ABCs in ``base.py`` and join this registry
through ``register_transport`` under their own names. Built-ins are imported on first
use, so using "shm" never needs the Mooncake wheel.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from checkpoint_engine.transports.base import WeightReceiver, WeightSender

# name -> (module, sender class, receiver class)
_BUILTIN: dict[str, tuple[str, str, str]] = {
    "mooncake": ("checkpoint_engine.transports.mooncake", "MooncakeSender", "MooncakeReceiver"),
    "shm": ("checkpoint_engine.transports.shm", "ShmSender", "ShmReceiver"),
}
_REGISTERED: dict[str, tuple[type[WeightSender], type[WeightReceiver]]] = {}


def register_transport(
    name: str, sender: type[WeightSender], receiver: type[WeightReceiver]
) -> None:
    """Make a transport available by ``name`` (an error if the name is taken)."""
    if name in _BUILTIN or name in _REGISTERED:
        raise ValueError(f"weight transport {name!r} is already registered")
    if not (issubclass(sender, WeightSender) and issubclass(receiver, WeightReceiver)):
        raise TypeError("a transport registers a WeightSender and a WeightReceiver subclass")
    _REGISTERED[name] = (sender, receiver)


def known_transports() -> list[str]:
    return sorted([*_BUILTIN, *_REGISTERED])


def _classes(name: str) -> tuple[type[WeightSender], type[WeightReceiver]]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(
            f"unknown weight transport {name!r}; known: {', '.join(known_transports())}"
        )
    module_name, sender, receiver = _BUILTIN[name]
    module = importlib.import_module(module_name)
    return getattr(module, sender), getattr(module, receiver)


def _build(cls: type, role: str, name: str, opts: dict[str, Any]) -> Any:
    try:
        inspect.signature(cls).bind(**opts)
    except TypeError as exc:
        params = [p for p in inspect.signature(cls).parameters if p not in ("self",)]
        raise TypeError(
            f"bad options for the {name!r} weight {role}: {exc}; it accepts: {', '.join(params)}"
        ) from None
    return cls(**opts)


def get_sender(name: str, **opts: Any) -> WeightSender:
    return _build(_classes(name)[0], "sender", name, opts)


def get_receiver(name: str, **opts: Any) -> WeightReceiver:
    return _build(_classes(name)[1], "receiver", name, opts)


__all__ = ["get_receiver", "get_sender", "known_transports", "register_transport"]
