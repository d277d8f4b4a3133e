"""Fault injection over the real token: a wrapper around the python-pkcs11 objects hsmsignd
uses, driven by a fault plan in a JSON file that a test rewrites while the daemon runs.

The wrapper is installed only by the test launcher ``tests/harness/faulty_hsmsignd.py``
(``server.pkcs11.intercept.install``); hsmsignd itself never installs it. A plan::

    {"faults": [
        {"call": "sign", "error": "DeviceError", "times": 1},
        {"call": "find_objects", "result": "empty", "until": "initialize"},
        {"call": "decrypt", "error": "GeneralError"},
        {"call": "sign", "hang_seconds": 3, "times": 1},
        {"call": "sign", "latency_seconds": 0.05},
        {"call": "create_object", "error": "DeviceError", "after": true, "times": 1}
    ]}

``call`` is one of ``CALLS``; ``error`` a python-pkcs11 exception class name; ``result:
"empty"`` makes ``find_objects`` find nothing (what SoftHSM2 does after one failed read);
``times`` how often it fires (absent: every time while the plan stays); ``until:
"initialize"``: until the module is re-initialised (then it is spent); ``after``: the real
call is made first and the error raised after it (a token that did the work but whose
answer was lost; offered for ``create_object``). Counts start again
when the file changes. Every firing appends ``call fault`` to ``PLAN.fired``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pkcs11.exceptions as p11e

#: The calls a plan can name.
CALLS: Final = frozenset(
    {
        "initialize",
        "get_token",
        "open",
        "login",
        "find_objects",
        "attribute",
        "sign",
        "decrypt",
        "unwrap",
        "generate",
        "create_object",
        "destroy",
        "random",
    }
)

#: The environment variable the launcher reads the plan's path from (the daemon never does).
PLAN_VARIABLE: Final = "HSMSIGN_TEST_FAULT_PLAN"


@dataclass
class _Fault:
    call: str
    error: str | None = None
    result: str | None = None
    times: int | None = None
    until: str | None = None
    hang_seconds: float = 0.0
    latency_seconds: float = 0.0
    after: bool = False
    fired: int = 0
    spent: bool = False


@dataclass
class FaultPlan:
    """The plan in ``path``, re-read whenever the file changes."""

    path: Path
    _stamp: tuple[int, int] = (0, 0)
    _faults: list[_Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._faults, self._stamp = [], (0, 0)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            raw = json.loads(self.path.read_text() or "{}")
        except ValueError:
            return  # being rewritten: keep the last plan
        faults = [_Fault(**f) for f in raw.get("faults", [])]
        unknown = [f.call for f in faults if f.call not in CALLS]
        if unknown:
            raise ValueError(f"fault plan {self.path}: unknown calls {unknown}")
        self._faults = faults

    def fire(self, call: str, after: bool = False) -> str | None:
        """Applies the faults for ``call`` (those with this ``after``): sleeps for a hang or
        latency, raises an error; returns the ``result`` override (``"empty"``) if one
        applies."""
        sleep = 0.0
        error: str | None = None
        result: str | None = None
        with self._lock:
            self._reload()
            if call == "initialize":
                for f in self._faults:
                    if f.until == "initialize":
                        f.spent = True
            for f in self._faults:
                if f.call != call or f.after != after or f.spent:
                    continue
                if f.times is not None and f.fired >= f.times:
                    continue
                f.fired += 1
                sleep += f.hang_seconds + f.latency_seconds
                error = error or f.error
                result = result or f.result
                with (self.path.parent / (self.path.name + ".fired")).open("a") as log:
                    log.write(f"{call} {f.error or f.result or 'delay'}\n")
        if sleep:
            time.sleep(sleep)
        if error is not None:
            raise getattr(p11e, error)()
        return result


class _Wrapped:
    """Delegates everything to the real python-pkcs11 object."""

    def __init__(self, real: Any, plan: FaultPlan) -> None:
        self._real = real
        self._plan = plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _Object(_Wrapped):
    def __getitem__(self, attr: Any) -> Any:
        self._plan.fire("attribute")
        return self._real[attr]

    def sign(self, *args: Any, **kwargs: Any) -> Any:
        self._plan.fire("sign")
        return self._real.sign(*args, **kwargs)

    def decrypt(self, *args: Any, **kwargs: Any) -> Any:
        self._plan.fire("decrypt")
        return self._real.decrypt(*args, **kwargs)

    def unwrap_key(self, *args: Any, **kwargs: Any) -> Any:
        self._plan.fire("unwrap")
        return _Object(self._real.unwrap_key(*args, **kwargs), self._plan)

    def destroy(self) -> None:
        self._plan.fire("destroy")
        self._real.destroy()


class _Session(_Wrapped):
    def get_objects(self, attrs: Mapping[Any, Any] | None = None) -> Iterator[Any]:
        if self._plan.fire("find_objects") == "empty":
            return iter(())
        return (_Object(o, self._plan) for o in list(self._real.get_objects(attrs)))

    def generate_random(self, bits: int) -> Any:
        self._plan.fire("random")
        return self._real.generate_random(bits)

    def create_object(self, attrs: Any) -> Any:
        self._plan.fire("create_object")
        created = self._real.create_object(attrs)
        self._plan.fire("create_object", after=True)
        return _Object(created, self._plan)

    def generate_key(self, *args: Any, **kwargs: Any) -> Any:
        self._plan.fire("generate")
        return _Object(self._real.generate_key(*args, **kwargs), self._plan)

    def generate_keypair(self, *args: Any, **kwargs: Any) -> Any:
        self._plan.fire("generate")
        pub, priv = self._real.generate_keypair(*args, **kwargs)
        return _Object(pub, self._plan), _Object(priv, self._plan)


class _Token(_Wrapped):
    def open(self, *args: Any, **kwargs: Any) -> Any:
        self._plan.fire("login" if kwargs.get("user_pin") is not None else "open")
        return _Session(self._real.open(*args, **kwargs), self._plan)


class _Lib(_Wrapped):
    def get_token(self, **kwargs: Any) -> Any:
        self._plan.fire("get_token")
        return _Token(self._real.get_token(**kwargs), self._plan)

    def initialize(self) -> None:
        self._plan.fire("initialize")
        self._real.initialize()


def wrapper(plan_path: Path) -> Any:
    """What ``server.pkcs11.intercept.install`` takes: wraps the loaded lib."""
    plan = FaultPlan(plan_path)
    return lambda lib: _Lib(lib, plan)


def write_plan(path: Path, *faults: Mapping[str, Any]) -> None:
    """Replaces the plan atomically (the daemon sees the whole new plan or the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"faults": list(faults)}))
    os.replace(tmp, path)


def fired(path: Path) -> list[str]:
    """The faults that fired so far, in order (``call fault`` lines)."""
    log = path.parent / (path.name + ".fired")
    return log.read_text().splitlines() if log.exists() else []


def launcher(plan_path: Path, log_delay: float = 0.0) -> tuple[str, ...]:
    """The command that runs hsmsignd with the wrapper over its token, driven by
    ``plan_path`` (``start_daemon(..., command=launcher(plan))``). ``log_delay``: seconds
    each log line reaches the log late (tests/harness/faulty_hsmsignd.py)."""
    env = ("env", f"HSMSIGN_TEST_LOG_DELAY={log_delay}") if log_delay else ()
    return (*env, sys.executable, "-m", "tests.harness.faulty_hsmsignd", str(plan_path))
