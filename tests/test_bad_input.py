"""Bad input: every mistake a user (or a disk) can make fails clearly and writes nothing half."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import math
import os
import pathlib
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import perdure
from conftest import Backend, Gate, attach
from perdure import (
    ConfigurationError,
    InvocationFailedError,
    InvocationStoppedError,
    JournalDecodeError,
    NotFoundError,
    PayloadTooLargeError,
    RuntimeLockedError,
    SerializationError,
    Status,
    StorageError,
    StorageFullError,
    UnknownWorkflowError,
)
from perdure.storage import EntryKind, SQLiteStore, open_store
from perdure.testing import FakeClock


@dataclasses.dataclass
class Charge:
    id: str
    amount_cents: int


class Opaque:
    """A plain class: not a dataclass, Struct or pydantic model."""


async def crash_at_gate(
    backend: Backend, wf: perdure.Workflow[Any, Any], gate: Gate, *args: Any, **kwargs: Any
) -> perdure.InvocationHandle[Any]:
    async with backend.runtime([wf], **kwargs) as rt:
        handle = await rt.client.start(wf, *args)
        await gate.until_reached(handle)
    return handle


# -- values that cannot be journaled --------------------------------------------------


@pytest.fixture
def a_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        yield sock
    finally:
        sock.close()


UNSERIALIZABLE: dict[str, Callable[[socket.socket], Any]] = {
    "object": lambda _: object(),
    "socket": lambda sock: sock,
    "function": lambda _: len,
    "plain-class": lambda _: Opaque(),
    "nested-object": lambda _: {"ok": [1, 2], "bad": [object()]},
    "dataclass-with-wrong-field-type": lambda _: Charge("c", "not-an-int"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(UNSERIALIZABLE))
async def test_unserializable_step_result_fails_the_step_and_replays_the_same_error(
    backend: Backend, gate: Gate, case: str, a_socket: socket.socket
) -> None:
    calls: list[str] = []
    seen: list[BaseException] = []

    def produce() -> Any:
        calls.append(case)
        return UNSERIALIZABLE[case](a_socket)

    @perdure.workflow(name="unserializable")
    async def wf(ctx: perdure.Context) -> str:
        try:
            await ctx.run("value", produce, retry=perdure.RetryPolicy(max_attempts=3))
        except SerializationError as exc:
            seen.append(exc)
        await ctx.run("gate", gate.wait)
        return "survived"

    handle = await crash_at_gate(backend, wf, gate)
    assert calls == [case]  # a serialization failure is not retried
    gate.open()
    async with backend.runtime([wf]) as rt:
        assert await attach(rt, handle).result() == "survived"
        journal = await rt.store.read_journal(handle.id)
        step = journal[1]
        assert (step.kind, step.name, step.ok) == (EntryKind.STEP, "value", False)
        summary = rt.codec.error_summary(step.payload)
        assert summary["type"].endswith(":SerializationError")
        assert [e.name for e in journal] == ["unserializable", "value", "gate", "unserializable"]
    assert calls == [case]
    live, replayed = seen
    assert type(live) is SerializationError
    assert type(replayed) is SerializationError
    assert str(replayed) == str(live)
    if case != "dataclass-with-wrong-field-type":
        assert "step 'value'" in str(live)
        assert handle.id in str(live)


@pytest.mark.parametrize(
    "value",
    [{1, 2}, frozenset({"a"}), b"raw bytes", (1, "a")],
    ids=["set", "frozenset", "bytes", "tuple"],
)
async def test_non_json_step_result_is_refused_or_kept(store_url: str, value: Any) -> None:
    @perdure.workflow(name="non-json")
    async def wf(ctx: perdure.Context) -> str:
        try:
            got = await ctx.run("value", lambda: value)
        except SerializationError:
            return "refused"
        return "kept" if type(got) is type(value) and got == value else f"changed to {got!r}"

    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock()) as rt:
        # Without a return annotation these would come back as another type.
        assert await rt.client.run(wf) == "refused"


def make_set() -> set[int]:
    return {3, 1, 2}


def make_bytes() -> bytes:
    return b"\x00\xffraw"


@pytest.mark.parametrize("make", [make_set, make_bytes], ids=["set", "bytes"])
async def test_non_json_step_result_with_annotation_round_trips(
    backend: Backend, gate: Gate, make: Callable[[], Any]
) -> None:
    seen: list[Any] = []

    @perdure.workflow(name="annotated")
    async def wf(ctx: perdure.Context) -> None:
        seen.append(await ctx.run("value", make))
        await ctx.run("gate", gate.wait)

    handle = await crash_at_gate(backend, wf, gate)
    gate.open()
    async with backend.runtime([wf]) as rt:
        await attach(rt, handle).result()
    assert seen == [make(), make()]
    assert [type(v) for v in seen] == [type(make())] * 2


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
async def test_non_finite_float_step_result_is_the_same_live_and_on_replay(
    backend: Backend, gate: Gate, value: float
) -> None:
    seen: list[Any] = []

    @perdure.workflow(name="floats")
    async def wf(ctx: perdure.Context) -> None:
        try:
            seen.append(await ctx.run("value", lambda: value))
        except SerializationError as exc:
            seen.append(type(exc))
        await ctx.run("gate", gate.wait)

    handle = await crash_at_gate(backend, wf, gate)
    gate.open()
    async with backend.runtime([wf]) as rt:
        await attach(rt, handle).result()
    live, replayed = seen
    if live is SerializationError:  # refusing it up front would be fine too
        assert replayed is SerializationError
    else:
        assert isinstance(replayed, float), replayed
        assert (math.isnan(live) and math.isnan(replayed)) or live == replayed


@dataclasses.dataclass
class CallableRecord:
    """A callable dataclass: eq=True makes instances unhashable."""

    value: int

    def __call__(self) -> int:
        return self.value


async def test_unhashable_callable_can_be_a_step(store_url: str) -> None:
    @perdure.workflow(name="unhashable")
    async def wf(ctx: perdure.Context) -> int:
        return await ctx.run("call", CallableRecord(7))

    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock()) as rt:
        assert await rt.client.run(wf) == 7


async def test_unserializable_workflow_result_fails_the_invocation(store_url: str) -> None:
    @perdure.workflow(name="bad-output")
    async def wf(ctx: perdure.Context) -> Any:
        return object()

    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock()) as rt:
        handle = await rt.client.start(wf)
        with pytest.raises(InvocationFailedError) as info:
            await handle.result()
        assert type(info.value.__cause__) is SerializationError
        assert await handle.status() is Status.FAILED


async def test_workflow_result_that_cannot_be_read_back_fails_the_invocation(
    store_url: str,
) -> None:
    @perdure.workflow(name="unreadable-output")
    async def wf(ctx: perdure.Context) -> Charge:
        return Charge("c", "not-an-int")  # type: ignore[arg-type]

    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock()) as rt:
        handle = await rt.client.start(wf)
        with pytest.raises(InvocationFailedError) as info:
            await handle.result()
        assert type(info.value.__cause__) is SerializationError
        assert await handle.status() is Status.FAILED


# -- unknown workflows and invocations -------------------------------------------------


async def test_unknown_workflow_name_lists_registered_names(store_url: str) -> None:
    @perdure.workflow(name="alpha")
    async def alpha(ctx: perdure.Context) -> None:
        return None

    @perdure.workflow(name="beta")
    async def beta(ctx: perdure.Context) -> None:
        return None

    @perdure.workflow(name="gamma")
    async def unregistered(ctx: perdure.Context) -> None:
        return None

    async with perdure.Runtime(store_url, workflows=[beta, alpha], clock=FakeClock()) as rt:
        with pytest.raises(UnknownWorkflowError) as info:
            await rt.client.start("nope")
        message = str(info.value)
        assert "'nope'" in message
        assert "alpha, beta" in message
        assert isinstance(info.value, NotFoundError)

        with pytest.raises(UnknownWorkflowError, match="gamma"):
            await rt.client.run(unregistered)
        assert await rt.client.list() == []

    async with perdure.Runtime(store_url, clock=FakeClock()) as rt:
        with pytest.raises(UnknownWorkflowError, match="registered: none"):
            await rt.client.start("alpha")


async def test_unknown_invocation_id_is_not_found(store_url: str) -> None:
    async with perdure.Runtime(store_url, clock=FakeClock()) as rt:
        with pytest.raises(NotFoundError, match="no-such-id"):
            await rt.client.get("no-such-id")
        handle = perdure.InvocationHandle(rt, "no-such-id", "wf")
        with pytest.raises(NotFoundError):
            await handle.status()
        with pytest.raises(NotFoundError):
            await handle.result()


async def test_runtime_not_started_refuses_to_start_invocations() -> None:
    @perdure.workflow(name="idle")
    async def wf(ctx: perdure.Context) -> None:
        return None

    rt = perdure.Runtime("memory://", workflows=[wf])
    with pytest.raises(ConfigurationError, match="not started"):
        await rt.client.start(wf)


def test_conflicting_registrations_are_refused() -> None:
    @perdure.workflow(name="same")
    async def one(ctx: perdure.Context) -> None:
        return None

    @perdure.workflow(name="same")
    async def two(ctx: perdure.Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="'same'"):
        perdure.Runtime("memory://", workflows=[one, two])


def test_bad_workflow_definitions_are_refused() -> None:
    def not_async(ctx: Any) -> None:
        return None

    async def no_ctx() -> None:
        return None

    with pytest.raises(ConfigurationError, match="async def"):
        perdure.workflow(not_async)
    with pytest.raises(ConfigurationError, match="context"):
        perdure.workflow(no_ctx)
    with pytest.raises(ConfigurationError, match="not a workflow"):
        perdure.Runtime("memory://", workflows=[42])  # type: ignore[list-item]


# -- bad configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("foo://x", "unknown scheme 'foo'"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite:///", "names no file"),
        ("sqlite:///x.db?bogus=1", "unknown option 'bogus'"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous"),
        ("postgresql://db.example/perdure?schema=Bad-Name", "not a valid schema name"),
        ("postgres://db.example/perdure?schema=pg_catalog", "not a valid schema name"),
        ("x.db", "sqlite:///"),
        ("", "sqlite:///"),
    ],
)
def test_bad_store_urls_are_configuration_errors(
    url: str, hint: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError) as info:
        perdure.Runtime(url)
    assert hint in str(info.value)
    if url:
        assert url in str(info.value) or "synchronous" in hint
    with pytest.raises(ConfigurationError):
        open_store(url)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "store", [123, None, b"sqlite:///x.db", pathlib.Path("x.db"), object()], ids=repr
)
def test_non_string_store_is_a_configuration_error(store: Any) -> None:
    with pytest.raises(ConfigurationError, match=type(store).__name__):
        perdure.Runtime(store)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_payload_bytes": 0},
        {"max_payload_bytes": -1},
        {"max_payload_bytes": "1MB"},
        {"default_retry": 3},
    ],
    ids=repr,
)
def test_bad_runtime_options_are_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        perdure.Runtime("memory://", **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"max_attempts": 1.5}, {"backoff_factor": 0.5}, {"max_interval": 5}],
    ids=repr,
)
def test_bad_retry_policies_are_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        perdure.RetryPolicy(**kwargs)


async def _start_error(url: str, **kwargs: Any) -> BaseException | None:
    try:
        async with perdure.Runtime(url, clock=FakeClock(), **kwargs):
            return None
    except Exception as exc:
        return exc


async def test_database_path_that_is_a_directory(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    error = await _start_error(f"sqlite:///{directory}")
    assert isinstance(error, StorageError | ConfigurationError)
    assert str(directory) in str(error)
    assert list(directory.iterdir()) == []


async def test_database_in_a_missing_directory(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "missing" / "x.db"
    error = await _start_error(f"sqlite:///{path}")
    assert isinstance(error, ConfigurationError)
    assert "does not exist" in str(error)
    assert str(path.parent) in str(error)
    assert not path.parent.exists()


async def test_database_under_a_regular_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    error = await _start_error(f"sqlite:///{tmp_path}/file/x.db")
    assert isinstance(error, ConfigurationError)


async def test_file_that_is_not_a_database(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "garbage.db"
    garbage = b"this is not an SQLite database, just some text " * 100
    path.write_bytes(garbage)
    error = await _start_error(f"sqlite:///{path}")
    assert isinstance(error, StorageError)
    assert "not a valid database" in str(error) or "corrupt" in str(error)
    assert path.read_bytes() == garbage


async def test_database_from_a_newer_perdure_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    error = await _start_error(f"sqlite:///{path}")
    assert isinstance(error, ConfigurationError)
    assert "upgrade" in str(error)
    # The failed start left nothing locked: the file can be opened again.
    assert isinstance(await _start_error(f"sqlite:///{path}"), ConfigurationError)


def _mount_tmpfs(path: pathlib.Path, options: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in this sandbox: {proc.stderr.strip()}")


def _umount(path: pathlib.Path) -> None:
    proc = subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture
def read_only_dir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "ro,size=1m")
    try:
        yield mnt
    finally:
        _umount(mnt)


async def test_database_in_a_read_only_location(read_only_dir: pathlib.Path) -> None:
    error = await _start_error(f"sqlite:///{read_only_dir}/x.db")
    assert isinstance(error, StorageError | ConfigurationError), repr(error)


async def test_database_in_a_read_only_location_without_lock(
    read_only_dir: pathlib.Path,
) -> None:
    store = open_store(f"sqlite:///{read_only_dir}/x.db")  # not exclusive: no lock file
    with pytest.raises(StorageError, match="cannot open or write"):
        await store.open()


# -- a full disk ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "size=2m")
    try:
        yield mnt
    finally:
        _umount(mnt)


def _fill(directory: pathlib.Path) -> pathlib.Path:
    """Fill the file system of ``directory`` to the last byte; return the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = 1 << 16
        while chunk:
            try:
                f.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    return filler


async def test_full_disk_raises_storage_full_and_loses_nothing(small_disk: pathlib.Path) -> None:
    url = f"sqlite:///{small_disk}/x.db"
    release = asyncio.Event()

    @perdure.workflow(name="small")
    async def small(ctx: perdure.Context, n: int) -> str:
        return await ctx.run("work", lambda: f"small-{n}")

    @perdure.workflow(name="big")
    async def big(ctx: perdure.Context) -> int:
        await ctx.run("wait", release.wait)
        blob = await ctx.run("blob", lambda: "x" * 300_000)
        return len(blob)

    workflows = [small, big]
    async with perdure.Runtime(url, workflows=workflows, clock=FakeClock()) as rt:
        done = [await rt.client.start(small, n) for n in range(5)]
        assert [await h.result() for h in done] == [f"small-{n}" for n in range(5)]
        journals = {h.id: await rt.store.read_journal(h.id) for h in done}
        victim = await rt.client.start(big)
        await asyncio.sleep(0)

        filler = _fill(small_disk)

        # A new invocation cannot be recorded: nothing of it is kept.
        with pytest.raises(StorageFullError) as info:
            await rt.client.start(small, 99)
        assert "full" in str(info.value)
        # A step whose result cannot be recorded leaves its invocation unfinished.
        release.set()
        with pytest.raises(InvocationStoppedError) as stopped:
            await victim.result()
        assert isinstance(stopped.value.__cause__, StorageFullError)
        assert await victim.status() is Status.RUNNING

        # Space comes back: the stopped invocation goes on by itself, in the
        # same runtime, from its journal.
        filler.unlink()

        async def relaunched() -> bool:
            rec = await rt.store.get_invocation(victim.id)
            return rec is not None and rec.status is Status.COMPLETED

        async with asyncio.timeout(30):
            while not await relaunched():
                await asyncio.sleep(0.01)
        assert await victim.result() == 300_000

    async with perdure.Runtime(url, workflows=workflows, clock=FakeClock()) as rt:
        assert await attach(rt, victim).result() == 300_000
        for h in done:
            assert await (await rt.client.get(h.id)).result() == f"small-{done.index(h)}"
            assert await rt.store.read_journal(h.id) == journals[h.id]
        assert len(await rt.client.list(workflow="small")) == 5
        assert await rt.client.list(status=Status.RUNNING) == []


# -- payload size limits -------------------------------------------------------------


async def test_oversized_input_is_refused_before_anything_is_written(store_url: str) -> None:
    @perdure.workflow(name="sized")
    async def wf(ctx: perdure.Context, data: str) -> int:
        return len(data)

    async with perdure.Runtime(
        store_url, workflows=[wf], clock=FakeClock(), max_payload_bytes=1000
    ) as rt:
        with pytest.raises(PayloadTooLargeError) as info:
            await rt.client.start(wf, "x" * 2000, idempotency_key="big")
        assert "1,000" in str(info.value)
        assert isinstance(info.value, SerializationError)
        assert await rt.client.list() == []
        # The key was not taken by the failed start.
        assert await rt.client.run(wf, "x" * 10, idempotency_key="big") == 10


async def test_oversized_step_result_fails_the_step(backend: Backend, gate: Gate) -> None:
    seen: list[BaseException] = []
    calls: list[int] = []

    def produce() -> str:
        calls.append(1)
        return "x" * 5000

    @perdure.workflow(name="big-step")
    async def wf(ctx: perdure.Context) -> str:
        try:
            await ctx.run("produce", produce)
        except PayloadTooLargeError as exc:
            seen.append(exc)
        small = await ctx.run("small", lambda: "fits")
        await ctx.run("gate", gate.wait)
        return small

    handle = await crash_at_gate(backend, wf, gate, max_payload_bytes=1000)
    gate.open()
    async with backend.runtime([wf], max_payload_bytes=1000) as rt:
        assert await attach(rt, handle).result() == "fits"
        step = (await rt.store.read_journal(handle.id))[1]
        assert (step.name, step.ok) == ("produce", False)
        assert rt.codec.error_summary(step.payload)["type"].endswith(":PayloadTooLargeError")
    assert calls == [1]
    assert [type(e) for e in seen] == [PayloadTooLargeError, PayloadTooLargeError]
    assert str(seen[0]) == str(seen[1])


async def test_oversized_workflow_result_fails_the_invocation(store_url: str) -> None:
    @perdure.workflow(name="big-output")
    async def wf(ctx: perdure.Context) -> str:
        return "x" * 5000

    async with perdure.Runtime(
        store_url, workflows=[wf], clock=FakeClock(), max_payload_bytes=1000
    ) as rt:
        handle = await rt.client.start(wf)
        with pytest.raises(InvocationFailedError) as info:
            await handle.result()
        assert type(info.value.__cause__) is PayloadTooLargeError
        assert await handle.status() is Status.FAILED


# -- wrong workflow arguments ----------------------------------------------------------


@perdure.workflow(name="typed-args")
async def typed_args(ctx: perdure.Context, n: int, *, label: str) -> str:
    return f"{label}:{n}"


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((), {}, TypeError),
        ((1,), {}, TypeError),
        ((1, 2), {"label": "x"}, TypeError),
        ((1,), {"label": "x", "extra": 1}, TypeError),
        (("abc",), {"label": "x"}, SerializationError),
        ((1,), {"label": 5}, SerializationError),
        ((object(),), {"label": "x"}, SerializationError),
        ((1,), {"label": "x", "idempotency_key": ""}, TypeError),
        ((1,), {"label": "x", "idempotency_key": 5}, TypeError),
        ((1,), {"label": "x", "invocation_id": ""}, TypeError),
    ],
    ids=[
        "missing-all",
        "missing-kwarg",
        "too-many",
        "unexpected-kwarg",
        "str-for-int",
        "int-for-str",
        "unserializable",
        "empty-key",
        "int-key",
        "empty-id",
    ],
)
async def test_bad_workflow_arguments_fail_before_anything_is_written(
    store_url: str, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    async with perdure.Runtime(store_url, workflows=[typed_args], clock=FakeClock()) as rt:
        with pytest.raises(error) as info:
            await rt.client.start(typed_args, *args, **kwargs)
        assert type(info.value) is error
        if error is TypeError and "key" not in str(kwargs) and "id" not in str(kwargs):
            assert "typed-args" in str(info.value)
        assert await rt.client.list() == []
        assert rt.stats.invocations_started == 0
        assert await rt.client.run(typed_args, 1, label="ok") == "ok:1"


async def test_numeric_strings_are_coerced_to_annotated_types(store_url: str) -> None:
    async with perdure.Runtime(store_url, workflows=[typed_args], clock=FakeClock()) as rt:
        assert await rt.client.run(typed_args, "7", label="lax") == "lax:7"


async def test_bad_step_arguments_to_ctx_run(store_url: str) -> None:
    @perdure.workflow(name="bad-run")
    async def wf(ctx: perdure.Context, what: str) -> None:
        if what == "name":
            await ctx.run("", lambda: 1)
        elif what == "fn":
            await ctx.run("step", 42)  # type: ignore[arg-type]
        else:
            await ctx.run("step", lambda: 1, idempotency_key="")

    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock()) as rt:
        for what in ("name", "fn", "key"):
            handle = await rt.client.start(wf, what)
            with pytest.raises(InvocationFailedError) as info:
                await handle.result()
            assert type(info.value.__cause__) is TypeError
            assert len(await rt.store.read_journal(handle.id)) == 2  # input and output


# -- a corrupt journal -------------------------------------------------------------------


def _corrupt(path: str, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            assert conn.execute(sql, params).rowcount == 1
    finally:
        conn.close()


CORRUPTIONS = {
    "step-payload-garbage": (
        "UPDATE journal SET payload = ? WHERE idx = 1",
        b"\xff\xfe{not json",
        1,
    ),
    "step-payload-wrong-shape": ("UPDATE journal SET payload = ? WHERE idx = 1", b'{"id": 5}', 1),
    "step-type-tag-gone": (
        "UPDATE journal SET type_tag = ? WHERE idx = 1",
        "no_such_module.anywhere:Gone",
        1,
    ),
    "error-payload-garbage": ("UPDATE journal SET payload = ? WHERE idx = 2", b"\x00\x01", 2),
    "error-payload-wrong-shape": ("UPDATE journal SET payload = ? WHERE idx = 2", b"[1, 2]", 2),
    "input-payload-garbage": ("UPDATE journal SET payload = ? WHERE idx = 0", b"{{{", 0),
    "input-payload-wrong-shape": ("UPDATE journal SET payload = ? WHERE idx = 0", b'{"x": 1}', 0),
}


def _failing_step() -> None:
    raise ValueError("recorded failure")


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
async def test_corrupt_journal_row_leaves_the_invocation_unfinished(
    tmp_path: pathlib.Path, gate: Gate, case: str
) -> None:
    backend = Backend(f"sqlite:///{tmp_path}/x.db")

    @perdure.workflow(name="corruptible")
    async def wf(ctx: perdure.Context, n: int) -> str:
        charge = await ctx.run("charge", lambda: Charge("c", n))
        with contextlib.suppress(ValueError):
            await ctx.run("fails", _failing_step, retry=perdure.RetryPolicy(max_attempts=1))
        await ctx.run("gate", gate.wait)
        return charge.id

    handle = await crash_at_gate(backend, wf, gate, 5)
    sql, value, index = CORRUPTIONS[case]
    _corrupt(backend.path, sql, value)

    gate.open()
    async with backend.runtime([wf]) as rt:
        with pytest.raises(InvocationStoppedError) as info:
            await attach(rt, handle).result()
        error = info.value.__cause__
        assert isinstance(error, JournalDecodeError)
        assert error.invocation_id == handle.id
        assert error.index == index
        assert handle.id in str(error)
        assert f"entry {index}" in str(error)
        await rt.client.wait_idle()
        assert await attach(rt, handle).status() is Status.RUNNING
        # Other invocations are not affected.
        assert await rt.client.run(wf, 7) == "c"
    assert gate.passed == 1  # only the healthy invocation got past the gate


async def _unfinished_with_corrupt_kind(
    backend: Backend, gate: Gate
) -> tuple[
    perdure.Workflow[[int], int], perdure.InvocationHandle[Any], perdure.InvocationHandle[Any]
]:
    """Two invocations blocked at ``gate``; the first one's step entry has a bogus kind."""

    @perdure.workflow(name="meta")
    async def wf(ctx: perdure.Context, n: int) -> int:
        await ctx.run("a", lambda: n)
        await ctx.run("gate", gate.wait)
        return n

    async with backend.runtime([wf]) as rt:
        bad = await rt.client.start(wf, 1)
        good = await rt.client.start(wf, 2)
        async with asyncio.timeout(30):
            while gate.waiting < 2:
                await asyncio.sleep(0)
    _corrupt(
        backend.path,
        "UPDATE journal SET kind = 'bogus' WHERE idx = 1 AND invocation_id = ?",
        bad.id,
    )
    gate.open()
    return wf, bad, good


async def test_corrupt_journal_metadata_stops_only_its_invocation(
    tmp_path: pathlib.Path, gate: Gate
) -> None:
    backend = Backend(f"sqlite:///{tmp_path}/x.db")
    wf, bad, good = await _unfinished_with_corrupt_kind(backend, gate)
    async with backend.runtime([wf]) as rt:
        bad_result = asyncio.ensure_future(attach(rt, bad).result())
        assert await attach(rt, good).result() == 2
        with pytest.raises(InvocationStoppedError) as info:
            await bad_result
        assert isinstance(info.value.__cause__, JournalDecodeError)
        assert info.value.__cause__.invocation_id == bad.id
        assert info.value.__cause__.index == 1


async def test_failed_start_releases_the_store(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/x.db"

    @perdure.workflow(name="released")
    async def wf(ctx: perdure.Context) -> int:
        return 1

    async def broken(self: Any, **kwargs: Any) -> Any:
        raise StorageError("the recovery query failed")

    # Recovery fails after the store opened and took its lock ...
    monkeypatch.setattr(SQLiteStore, "list_invocations", broken)
    first = perdure.Runtime(url, workflows=[wf], clock=FakeClock())
    with pytest.raises(StorageError, match="recovery query"):
        await first.start()
    monkeypatch.undo()
    # ... and the failed start released both: a new runtime starts and works.
    async with perdure.Runtime(url, workflows=[wf], clock=FakeClock()) as rt:
        assert await rt.client.run(wf) == 1


# -- one runtime per SQLite file --------------------------------------------------------------


async def test_second_runtime_on_the_same_file_is_locked_out(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"

    @perdure.workflow(name="locked")
    async def wf(ctx: perdure.Context, n: int) -> int:
        return await ctx.run("n", lambda: n)

    async with perdure.Runtime(url, workflows=[wf], clock=FakeClock()) as first:
        second = perdure.Runtime(url, workflows=[wf], clock=FakeClock())
        with pytest.raises(RuntimeLockedError) as info:
            await second.start()
        assert str(os.getpid()) in str(info.value)
        assert "x.db" in str(info.value)
        await second.stop()  # a no-op: it never started
        with pytest.raises(ConfigurationError, match="not started"):
            await second.client.start(wf, 1)
        # The first runtime is unaffected.
        assert await first.client.run(wf, 1) == 1

    # Once the first stops, the file is free again.
    async with perdure.Runtime(url, workflows=[wf], clock=FakeClock()) as third:
        assert await third.client.run(wf, 2) == 2
        assert len(await third.client.list()) == 2


def test_second_sync_runtime_on_the_same_file_is_locked_out(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    with perdure.SyncRuntime(url, clock=FakeClock()):
        second = perdure.SyncRuntime(url, clock=FakeClock())
        with pytest.raises(RuntimeLockedError):
            second.start()
        second.stop()
