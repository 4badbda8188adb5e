"""What crosses between the controller and the workers: plain data only (numbers, strings, tensors, lists, dicts)
and references to functions and dataclasses of this package by their package-relative names.

Inside ComfyUI the pack's modules carry a file path as their name, which another process cannot import; so a
function or dataclass of `qwen_image_core` travels as "qwen_image_core.<module>:<name>" (the worker imports the
package by that name) and a dataclass instance as its name and fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
from collections.abc import Callable

PACKAGE = "qwen_image_core"
PROTOCOL = pickle.HIGHEST_PROTOCOL
DATACLASS = "__qwenpix_dataclass__"


def reference(obj) -> str:
    """'module:qualname' of a function or class, with a path-named package module cut to `qwen_image_core....`."""
    module = obj.__module__
    at = module.find(f"{PACKAGE}.")
    if at > 0 and module[at - 1] in "./\\":
        module = module[at:]
    return f"{module}:{obj.__qualname__}"


def resolve(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def encode(x):
    """Plain data for `decode` in another process (dataclass instances by name and fields, recursively)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: encode(getattr(x, f.name)) for f in dataclasses.fields(x)}
        return {DATACLASS: reference(type(x)), "fields": fields}
    if isinstance(x, (list, tuple)):
        return type(x)(encode(v) for v in x)
    if isinstance(x, dict):
        return {k: encode(v) for k, v in x.items()}
    return x


def decode(x):
    if isinstance(x, dict) and DATACLASS in x:
        return resolve(x[DATACLASS])(**{k: decode(v) for k, v in x["fields"].items()})
    if isinstance(x, (list, tuple)):
        return type(x)(decode(v) for v in x)
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    return x


def send(conn, obj) -> None:
    """Plain pickle (tensors by value): the multiprocessing pickler would hand tensors over as shared memory
    through a resource sharer that only multiprocessing's own children can reach."""
    conn.send_bytes(pickle.dumps(obj, protocol=PROTOCOL))


def recv(conn):
    return pickle.loads(conn.recv_bytes())
