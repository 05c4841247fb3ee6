"""Typed messages between processes: dataclasses with one msgpack encoder/decoder.

Every class registered with `@message` can cross a ZMQ socket:

    @message
    @dataclass
    class AbortMsg:
        rid: str

    sock.send(encode(AbortMsg("r1")));  msg = decode(sock.recv())

Fields must be msgpack-native (None, bool, int, float, str, bytes, list, dict) or other
registered messages (nested ones are rebuilt on decode). No pickling: a message is data only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import msgpack

_REGISTRY: dict[str, type] = {}
_TAG = "__msg__"
T = TypeVar("T")


def message(cls: type[T]) -> type[T]:
    """Register a dataclass as a message type (its class name is the wire tag)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass")
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"message name {name} registered twice")
    _REGISTRY[name] = cls
    return cls


def _to_wire(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        out[_TAG] = type(obj).__name__
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_wire(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    return obj


def _from_wire(obj: Any) -> Any:
    if isinstance(obj, dict):
        tag = obj.pop(_TAG, None)
        fields = {k: _from_wire(v) for k, v in obj.items()}
        if tag is None:
            return fields
        cls = _REGISTRY.get(tag)
        if cls is None:
            raise ValueError(f"unknown message type {tag!r}")
        return cls(**fields)
    if isinstance(obj, list):
        return [_from_wire(x) for x in obj]
    return obj


def encode(msg: Any) -> bytes:
    return msgpack.packb(_to_wire(msg), use_bin_type=True)


def decode(data: bytes) -> Any:
    return _from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False))
