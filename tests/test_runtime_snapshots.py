"""Runtime snapshots, restore, export/import and templates (mock backend: exact state)."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.images.tarbuild import file
from kelpie.backends import MOCK
from kelpie.images import ImageInUse, ImageStore
from kelpie.runtime import Runtime
from kelpie.runtime._archive import META_NAME
from kelpie.runtime._errors import SandboxStateError, SnapshotNameInUse, SnapshotNotFound
from kelpie.sim import Fault, FaultInjector, FaultSpec, SimRng, SimStorage
from kelpie.vm import (
    BackendRegistry,
    ConfigError,
    SnapshotCorrupted,
    SnapshotKind,
    VmCrashed,
    VmFactory,
    VmState,
)
from test_images_store import put_image


@pytest.fixture
def make_runtime(tmp_path: Path) -> Callable[..., Runtime]:
    registry = BackendRegistry()
    registry.register(MOCK)

    def make(**kw: Any) -> Runtime:
        kw.setdefault("data_dir", tmp_path / "data")
        kw.setdefault("factory", VmFactory(registry, environ={}))
        kw.setdefault("images", ImageStore(tmp_path / "images"))
        kw.setdefault("clock", itertools.count(1_000).__next__)
        return Runtime(**kw)

    return make


async def test_snapshot_restore_brings_back_files(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime() as rt:
        await rt.create(name="src", backend="mock", env={"A": "1"})
        await rt.write_file("src", "/tmp/before", b"kept")
        snap = await rt.snapshot("src", name="snap1")
        assert snap.kind is SnapshotKind.FULL and snap.size > 0 and snap.path is not None
        assert (snap.sandbox_id, snap.sandbox_name) == ((await rt.inspect("src")).id, "src")
        assert (await rt.inspect("src")).state is VmState.RUNNING  # resumed after the snapshot
        await rt.write_file("src", "/tmp/after", b"not in the snapshot")

        clone = await rt.restore("snap1", name="clone")
        assert clone.state is VmState.RUNNING and clone.id != snap.sandbox_id
        assert await rt.read_file("clone", "/tmp/before") == b"kept"
        assert [f.name for f in await rt.list_dir("clone", "/tmp")] == ["before"]
        assert b"A=1" in (await rt.exec("clone", ["env"])).stdout  # exec defaults kept
        paused = await rt.restore("snap1", paused=True)
        assert paused.state is VmState.PAUSED
        assert [s.name for s in (await rt.list_snapshots())] == ["snap1"]
        assert (await rt.inspect_snapshot(snap.id[:4])).name == "snap1"


async def test_snapshot_names_kinds_and_states(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime() as rt:
        await rt.create(name="box", backend="mock")
        first = await rt.snapshot("box", leave_paused=True)
        assert first.name.startswith("box-") and (await rt.inspect("box")).state is VmState.PAUSED
        with pytest.raises(SnapshotNameInUse):
            await rt.snapshot("box", name=first.name)
        with pytest.raises(ConfigError, match="snapshot kind 'nope'"):
            await rt.snapshot("box", kind="nope")
        with pytest.raises(SnapshotNotFound, match="no snapshot 'missing'"):
            await rt.restore("missing")
        await rt.stop("box")
        disk = await rt.snapshot("box", kind="disk", name="disk1")
        assert disk.kind is SnapshotKind.DISK
        booted = await rt.restore("disk1")
        assert booted.state is VmState.RUNNING


async def test_remove_and_crash_leftovers(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime() as rt:
        await rt.create(name="box", backend="mock")
        snap = await rt.snapshot("box", name="gone")
        await rt.delete_snapshot("gone")
        assert (await rt.list_snapshots()) == [] and not (rt.snapshots_dir / snap.id).exists()
        # what a crash can leave: a partial dir, a trashed one, an unrecorded complete one
        for name in (".abc.partial", ".trash-abc", "0123456789ab"):
            (rt.snapshots_dir / name).mkdir()
            (rt.snapshots_dir / name / "manifest.json").write_text("{}")
    async with make_runtime() as rt:
        assert list(rt.snapshots_dir.iterdir()) == []


async def test_export_import_round_trip(make_runtime: Callable[..., Runtime], tmp_path: Path,
                                        ) -> None:
    async with make_runtime() as rt:
        await rt.create(name="box", backend="mock")
        await rt.write_file("box", "/data", b"travels")
        await rt.snapshot("box", name="travel")
        for compress in (False, True):
            out = io.BytesIO()
            await rt.export_snapshot("travel", out, compress=compress)
            if not compress:
                with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
                    names = tar.getnames()
                assert names[:2] == [META_NAME, "manifest.json"]
            imported = await rt.import_snapshot(io.BytesIO(out.getvalue()),
                                                name=f"imported-{int(compress)}")
            clone = await rt.restore(imported.id)
            assert await rt.read_file(clone.id, "/data") == b"travels"
        with pytest.raises(SnapshotNameInUse):
            await rt.import_snapshot(io.BytesIO(out.getvalue()))  # "travel" exists


async def _archive(rt: Runtime, ref: str) -> bytes:
    out = io.BytesIO()
    await rt.export_snapshot(ref, out)
    return out.getvalue()


def _rewrite(data: bytes, change: Callable[[str, bytes], bytes | None]) -> bytes:
    """The archive with each member passed through ``change`` (None drops it)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as source, \
            tarfile.open(fileobj=out, mode="w") as tar:
        for member in source.getmembers():
            extracted = source.extractfile(member)
            assert extracted is not None
            content = change(member.name, extracted.read())
            if content is None:
                continue
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return out.getvalue()


def _middle_of_last_member(archive: bytes) -> int:
    """An offset inside the last member's data (cutting only the tar's zero padding
    would leave every byte of the snapshot there, which is rightly accepted)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + last.size // 2


async def test_damaged_archives_are_refused(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime() as rt:
        await rt.create(name="box", backend="mock")
        await rt.snapshot("box", name="orig")
        data = await _archive(rt, "orig")
        await rt.delete_snapshot("orig")

        def flip(name: str, content: bytes) -> bytes:
            if name in (META_NAME, "manifest.json"):
                return content
            return bytes([content[0] ^ 1]) + content[1:]

        cases = {
            "corrupted": (_rewrite(data, flip), "corrupted"),
            "truncated": (data[: _middle_of_last_member(data)],
                          "damaged or truncated|lacks blob"),
            "missing blob": (_rewrite(data, lambda n, c: c if n in (META_NAME, "manifest.json")
                                      else None), "lacks blob"),
            "no metadata": (_rewrite(data, lambda n, c: None if n == META_NAME else c),
                            "must start with"),
            "not a tar": (b"hello", "damaged or truncated|not a snapshot archive"),
        }
        for label, (archive, message) in cases.items():
            with pytest.raises(SnapshotCorrupted, match=message):
                await rt.import_snapshot(io.BytesIO(archive))
            assert (await rt.list_snapshots()) == [], label
            assert [p.name for p in rt.snapshots_dir.iterdir()] == [], label


async def test_templates_start_many_distinct_sandboxes(
    make_runtime: Callable[..., Runtime], tmp_path: Path,
) -> None:
    store = ImageStore(tmp_path / "images")
    image = put_image(store, [[file("etc/motd", "hi\n")]], tag="example.com/t:1",
                      runtime={"Env": ["FROM_IMAGE=1"]})
    async with make_runtime() as rt:
        template = await rt.create_template(name="tpl", image="example.com/t:1",
                                            backend="mock")
        assert template.template
        assert await rt.list_sandboxes(all=True) == []  # the build sandbox is gone
        with pytest.raises(ImageInUse):
            store.remove(image.digest)  # the template holds its image
        assert store.holders(image.digest) == (f"snapshot:{template.id}",)
        clones = [await rt.create(template="tpl", env={"N": str(i)}) for i in range(3)]
        assert len({c.id for c in clones}) == 3
        for i, clone in enumerate(clones):
            out = (await rt.exec(clone.id, ["env"])).stdout
            assert b"FROM_IMAGE=1" in out and f"N={i}".encode() in out
        with pytest.raises(ConfigError, match="cpus cannot be given with a template"):
            await rt.create(template="tpl", cpus=2)
        with pytest.raises(SnapshotNotFound, match="no template"):
            await rt.create(template="nosuch")
        assert [t.name for t in (await rt.list_snapshots(templates=True))] == ["tpl"]
        for clone in clones:
            await rt.remove(clone.id, force=True)
        await rt.delete_snapshot("tpl", template=True)
        assert store.holders(image.digest) == ()


async def test_roll_a_sandbox_back_in_place(make_runtime: Callable[..., Runtime]) -> None:
    async with make_runtime() as rt:
        info = await rt.create(name="box", backend="mock")
        await rt.write_file("box", "/tmp/state", b"good")
        await rt.snapshot("box", name="good")
        await rt.write_file("box", "/tmp/state", b"broken")
        with pytest.raises(SandboxStateError, match="stop it first"):
            await rt.restore_into("box", "good")
        await rt.stop("box")
        back = await rt.restore_into("box", "good")
        assert (back.id, back.name, back.state) == (info.id, "box", VmState.RUNNING)
        assert await rt.read_file("box", "/tmp/state") == b"good"
        await rt.create(name="other", backend="mock")
        await rt.stop("other")
        with pytest.raises(ConfigError, match="was taken from sandbox box"):
            await rt.restore_into("other", "good")


async def test_a_removal_cut_short_before_its_record_is_undone(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        await rt.create(name="box", backend="mock")
        await rt.write_file("box", "/data", b"still here")
        snap = await rt.snapshot("box", name="kept")
        # a crash between the rename to the trash and the deletion of the record
        (rt.snapshots_dir / snap.id).rename(rt.snapshots_dir / f".trash-{snap.id}")
    async with make_runtime() as rt:
        assert [s.name for s in (await rt.list_snapshots())] == ["kept"]
        assert sorted(p.name for p in rt.snapshots_dir.iterdir()) == [snap.id]
        clone = await rt.restore("kept")
        assert await rt.read_file(clone.id, "/data") == b"still here"


async def test_a_snapshot_whose_vm_fails_afterwards_leaves_nothing(
    make_runtime: Callable[..., Runtime],
) -> None:
    dies_on_resume = FaultInjector(SimRng(1), [FaultSpec(Fault.CRASH, 1.0,
                                                         operations=frozenset({"resume"}))])
    async with make_runtime(backend_options={"mock": {"faults": dies_on_resume}}) as rt:
        await rt.create(name="box", backend="mock")
        with pytest.raises(VmCrashed, match="during resume"):
            await rt.snapshot("box", name="never")
        assert (await rt.list_snapshots()) == []
        assert list(rt.snapshots_dir.iterdir()) == []  # written whole, removed at once


async def test_sandbox_directories_without_a_record_are_removed_on_open(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        box = await rt.create(name="box", backend="mock")
        own = rt.output_log(box.id).parent
        assert own.is_dir()  # made with the sandbox
        stray = own.parent / "0123456789ab"  # a remove cut short after its record went
        stray.mkdir()
    async with make_runtime() as rt:
        assert sorted(p.name for p in own.parent.iterdir()) == [box.id]
        await rt.remove("box", force=True)
        assert not own.exists()


async def test_the_runtime_changes_its_directories_only_through_its_storage(
    make_runtime: Callable[..., Runtime], tmp_path: Path,
) -> None:
    storage = SimStorage(SimRng(3))
    async with make_runtime(storage=storage, backend_options={"mock": {"storage": storage}},
                            ) as rt:
        await rt.create(name="box", backend="mock")
        await rt.write_file("box", "/data", b"in memory")
        snap = await rt.snapshot("box", name="s")
        clone = await rt.restore("s")
        assert await rt.read_file(clone.id, "/data") == b"in memory"
        assert storage.exists(rt.snapshots_dir / snap.id / "manifest.json")
        await rt.delete_snapshot("s")
        await rt.remove("box", force=True)
    # on the real disk: only the state database and the lock
    real = {p.name for p in (tmp_path / "data").iterdir()}
    assert real - {"runtime.db-shm", "runtime.db-wal"} == {"runtime.db", "runtime.lock"}
    assert storage.list_dir(tmp_path / "data" / "snapshots") == []
    assert storage.list_dir(tmp_path / "data" / "sandboxes") == [clone.id]
