"""kelpie build without a VM: Dockerfiles parsed and refused with their line, the stage's
file tree model, COPY/ADD layers (.dockerignore, --chown, --chmod, a hostile tar), the
context sent to a daemon, and whole builds with no RUN step (config, history, cache)."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import httpx
import pytest

from kelpie.agent import AgentClient, AgentRemoteError
from kelpie.api import NDJSON, BuildEvent
from kelpie.daemon import create_app
from kelpie.daemon._routes_builds import TAR
from kelpie.images import DockerfileError, ImageStore, UnsafeLayer, check_layer, parse_dockerfile
from kelpie.runtime import Runtime
from kelpie.runtime._build_copy import (
    BuildContext,
    LayerWriter,
    Owner,
    expand_sources,
    pack_context,
)
from kelpie.runtime._build_tree import FsTree
from kelpie.vm import TreeEntry
from test_agent import AgentProcess
from test_cli_e2e import DEMO
from vm_fixtures import demo_image_store


def _dir(path: str, mode: int = 0o755) -> TreeEntry:
    return TreeEntry(path, "dir", mode, 0, 0, 0, 0, 0)


def _link(path: str, target: str) -> TreeEntry:
    return TreeEntry(path, "symlink", 0o777, 0, 0, 0, 0, 0, target=target)


# ---- the Dockerfile ---------------------------------------------------------------------

def test_stages_global_args_and_flags_are_parsed() -> None:
    parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG BASE=demo\nFROM $BASE AS build\n"
        "RUN echo hi \\\n  there\nFROM build\nCOPY --from=build --chown=1:2 /a /b/\n")
    assert parsed.args == [("BASE", "demo")]
    first, second = parsed.stages
    assert (first.name, first.base, second.name, second.base) == ("build", "$BASE", None,
                                                                   "build")
    assert first.instructions[0].args == ("echo hi   there",)
    assert second.instructions[0].flags == {"from": "build", "chown": "1:2"}
    assert parsed.stage("0", 2, 1) is first and parsed.find("BUILD", 2) is first


@pytest.mark.parametrize(("text", "said"), [
    ("RUN true\n", "line 1: RUN before the first FROM"),
    ("FROM a\nFOO bar\n", "line 2: unknown instruction: FOO"),
    ("FROM a\nRUN --mount=type=cache,target=/c true\n", "RUN does not take --mount"),
    ("FROM a\nONBUILD RUN true\n", "ONBUILD triggers are not supported"),
    ("FROM a AS x\nFROM b AS x\n", "two stages are named 'x'"),
    ("# just a comment\n", "no FROM instruction"),
    ("FROM a b\n", "FROM takes IMAGE [AS NAME]"),
    ("FROM a\nCOPY <<EOF /x\nhi\nEOF\n", "here-documents are supported only as a whole RUN"),
])
def test_a_bad_dockerfile_is_refused_naming_its_line(text: str, said: str) -> None:
    with pytest.raises(DockerfileError, match=re.escape(said)):
        parse_dockerfile(text)


# ---- the stage's tree -------------------------------------------------------------------

def test_the_tree_resolves_links_like_the_kernel_and_names_missing_dirs() -> None:
    tree = FsTree([_dir("/usr"), _dir("/usr/bin"), _link("/bin", "usr/bin"),
                   _link("/abs", "/usr"), _link("/loop", "/loop")])
    assert tree.resolve("/bin/tool") == "/usr/bin/tool"
    assert tree.resolve("/abs/bin/../../etc") == "/etc"
    assert tree.is_dir("/bin") and not tree.is_dir("/etc")
    assert tree.missing_dirs("/bin/a/b") == ["/usr/bin/a", "/usr/bin/a/b"]
    assert tree.resolve("/loop/x") == "/loop/x"  # a loop stays; the layer check refuses it


def test_a_layer_listing_moves_the_tree_whiteouts_included() -> None:
    tree = FsTree([_dir("/etc"), TreeEntry("/etc/a", "file", 0o644, 0, 0, 1, 0, 0),
                   _dir("/opt"), TreeEntry("/opt/x", "file", 0o644, 0, 0, 1, 0, 0)])
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name in ("etc/.wh.a", "opt/.wh..wh..opq", "new"):
            tar.addfile(tarfile.TarInfo(name))
    tree.apply_tar(io.BytesIO(gzip.compress(data.getvalue())))
    assert sorted(tree.entries()) == ["/etc", "/new", "/opt"]


# ---- COPY and ADD layers ----------------------------------------------------------------

def _context(tmp_path: Path) -> Path:
    root = tmp_path / "context"
    if root.exists():
        return root
    (root / "app" / "cache").mkdir(parents=True)
    (root / "app" / "main.sh").write_text("echo main\n")
    (root / "app" / "main.sh").chmod(0o755)
    (root / "app" / "cache" / "junk").write_text("x")
    (root / "app" / "keep.log").write_text("kept")
    (root / "app" / "drop.log").write_text("dropped")
    (root / "app" / "link").symlink_to("main.sh")
    (root / ".dockerignore").write_text("**/cache\n*/*.log\n!app/keep.log\n")
    (root / "Dockerfile").write_text("FROM x\n")
    return root


def _layer(tree: FsTree, owner: Owner, write: object) -> dict[str, tarfile.TarInfo]:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        write(LayerWriter(tar, tree, owner, 7))  # type: ignore[operator]
    data.seek(0)
    with tarfile.open(fileobj=data) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_copy_of_a_directory_honours_dockerignore_owner_and_links(tmp_path: Path) -> None:
    root = _context(tmp_path)
    context = BuildContext(root)
    tree = FsTree([_dir("/usr"), _dir("/usr/local"), _link("/opt", "usr/local")])
    [(rel, host)] = expand_sources(root, "app", context, 7)
    members = _layer(tree, Owner(1000, 1000), lambda w: w.copy(host, "/opt/app", context, rel))
    assert sorted(members) == ["usr/local/app", "usr/local/app/keep.log",
                               "usr/local/app/link", "usr/local/app/main.sh"]
    main = members["usr/local/app/main.sh"]
    assert (main.mode, main.uid, main.gid, main.uname) == (0o755, 1000, 1000, "")
    assert members["usr/local/app/link"].linkname == "main.sh"
    assert tree.is_dir("/opt/app") and "/usr/local/app/main.sh" in tree


def test_copy_sources_are_matched_and_missing_ones_named(tmp_path: Path) -> None:
    root = _context(tmp_path)
    context = BuildContext(root)
    found = expand_sources(root, "app/*.log", context, 3)
    assert [rel for rel, _ in found] == ["app/keep.log"]  # drop.log is ignored
    with pytest.raises(DockerfileError, match=r"line 3: 'nothere' is not in the build "):
        expand_sources(root, "nothere", context, 3)
    # a link that points out of the context stays inside it
    (root / "escape").symlink_to("/etc")
    with pytest.raises(DockerfileError, match="'escape' is not in the build context"):
        expand_sources(root, "escape", context, 3)  # /etc inside the context: none there


def test_chmod_applies_and_copies_are_reproducible(tmp_path: Path) -> None:
    root = _context(tmp_path)
    host = root / "app" / "main.sh"

    def layer() -> bytes:
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
            LayerWriter(tar, FsTree(), Owner(chmod=0o600), 1).copy(host, "/x/main.sh", None,
                                                                   "app/main.sh")
        return data.getvalue()

    assert layer() == layer()
    with tarfile.open(fileobj=io.BytesIO(layer())) as tar:
        assert [(m.name, m.mode) for m in tar.getmembers()] == [("x", 0o755),
                                                                 ("x/main.sh", 0o600)]


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_add_unpacks_a_tar_and_refuses_one_that_escapes(tmp_path: Path) -> None:
    good = _tar(tmp_path / "good.tgz", (tarfile.TarInfo("./lib/a.txt"), b"a"))
    members = _layer(FsTree(), Owner(), lambda w: w.unpack(good, "/srv"))
    assert sorted(members) == ["srv", "srv/lib/a.txt"]
    evil = _tar(tmp_path / "evil.tgz", (tarfile.TarInfo("../../etc/passwd"), b"root"))
    with pytest.raises(DockerfileError, match=re.escape(
            "line 7: ADD evil.tgz: member '../../etc/passwd' leaves the destination")):
        _layer(FsTree(), Owner(), lambda w: w.unpack(evil, "/srv"))
    device = tarfile.TarInfo("dev/sda")
    device.type = tarfile.BLKTYPE
    nodes = _tar(tmp_path / "dev.tgz", (device, b""))
    with pytest.raises(DockerfileError, match="is a device node"):
        _layer(FsTree(), Owner(), lambda w: w.unpack(nodes, "/srv"))


def test_the_context_sent_leaves_out_what_dockerignore_says(tmp_path: Path) -> None:
    root = _context(tmp_path)
    (root / ".dockerignore").write_text("Dockerfile\n*/*.log\n")
    out = io.BytesIO()
    pack_context(root, "Dockerfile", out)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        names = set(tar.getnames())
    assert {"Dockerfile", ".dockerignore", "app/main.sh"} <= names
    assert not {"app/keep.log", "app/drop.log"} & names


# ---- whole builds with no RUN ------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return demo_image_store(tmp_path)


async def _build(tmp_path: Path, store: ImageStore, dockerfile: str,
                 **options: object) -> tuple[str, list[BuildEvent]]:
    root = _context(tmp_path)
    (root / "Dockerfile").write_text(dockerfile)
    events: list[BuildEvent] = []
    async with Runtime(data_dir=tmp_path / "state", images=store) as rt:
        image = await rt.build(root, progress=events.append, **options)
    return image.digest, events


async def test_a_build_without_run_makes_config_history_and_layers(
        tmp_path: Path, store: ImageStore) -> None:
    dockerfile = (
        "ARG WHO=nobody\nFROM " + DEMO + " AS base\nARG WHO\nENV GREETING=\"hi $WHO\" "
        "HOME=/home/app\nWORKDIR /srv/app\nCOPY app/main.sh ./\nLABEL team=kelpie\n"
        "USER 1000:1000\nEXPOSE 8080 53/udp\nENTRYPOINT [\"/bin/sh\"]\nCMD run.sh\n"
        "VOLUME /data\nSTOPSIGNAL SIGINT\n")
    digest, events = await _build(tmp_path, store, dockerfile, tag=["local/built:1"],
                                  build_arg=["WHO=you"])
    image = store.resolve("local/built:1")
    assert image.digest == digest
    config = json.loads(store.blobs.read_bytes(image.manifest.config.digest))
    settings = config["config"]
    assert "GREETING=hi you" in settings["Env"] and settings["WorkingDir"] == "/srv/app"
    assert (settings["User"], settings["Labels"], settings["StopSignal"]) == (
        "1000:1000", {"team": "kelpie"}, "SIGINT")
    assert settings["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert settings["Volumes"] == {"/data": {}}
    assert (settings["Entrypoint"], settings["Cmd"]) == (["/bin/sh"],
                                                         ["/bin/sh", "-c", "run.sh"])
    base = store.resolve(DEMO)
    assert len(image.manifest.layers) == len(base.manifest.layers) + 2  # WORKDIR, COPY
    made = [h for h in config["history"] if h.get("comment") == "kelpie build"]
    assert [h["created_by"].split()[0] for h in made] == [
        "ENV", "WORKDIR", "COPY", "LABEL", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "VOLUME",
        "STOPSIGNAL"]
    assert sum(not h.get("empty_layer") for h in made) == 2
    layer = gzip.decompress(store.blobs.read_bytes(image.manifest.layers[-1].digest))
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        assert tar.getnames() == ["srv/app/main.sh"]  # WORKDIR made the directories
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 13)) and steps[0].steps == 12

    again, _ = await _build(tmp_path, store, dockerfile, tag=["local/built:2"],
                            build_arg=["WHO=you"])
    assert again == digest  # the same inputs, the same image
    other, _ = await _build(tmp_path, store, dockerfile, build_arg=["WHO=them"])
    assert other != digest


async def test_entrypoint_drops_an_inherited_cmd_and_copy_from_reads_a_stage(
        tmp_path: Path, store: ImageStore) -> None:
    dockerfile = (f"FROM {DEMO} AS one\nCOPY app /app\nCMD [\"old\"]\n"
                  f"FROM one\nENTRYPOINT [\"/app/main.sh\"]\n"
                  f"FROM {DEMO}\nCOPY --from=one /app/main.sh /bin/tool\n"
                  "COPY --from=0 /etc/os-release /copied\n")
    await _build(tmp_path, store, dockerfile, tag=["local/second:1"], target="1")
    second = json.loads(store.blobs.read_bytes(
        store.resolve("local/second:1").manifest.config.digest))["config"]
    assert second["Entrypoint"] == ["/app/main.sh"] and "Cmd" not in second

    await _build(tmp_path, store, dockerfile, tag=["local/third:1"])
    third = store.resolve("local/third:1")
    layers = [gzip.decompress(store.blobs.read_bytes(d.digest))
              for d in third.manifest.layers[-2:]]
    with tarfile.open(fileobj=io.BytesIO(layers[0])) as tar:
        tool = tar.getmember("bin/tool")
        assert tool.mode == 0o755 and tar.extractfile(tool).read() == b"echo main\n"  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(layers[1])) as tar:
        assert tar.getnames() == ["copied"]


async def test_build_errors_name_what_to_fix(tmp_path: Path, store: ImageStore) -> None:
    with pytest.raises(DockerfileError, match=r"line 2: 'missing\.txt' is not in the build "):
        await _build(tmp_path, store, f"FROM {DEMO}\nCOPY missing.txt /\n")
    with pytest.raises(DockerfileError, match="COPY --from=later: that stage comes later"):
        await _build(tmp_path, store, f"FROM {DEMO}\nCOPY --from=later /x /\n"
                                      f"FROM {DEMO} AS later\n", target="0")
    with pytest.raises(DockerfileError, match="--chown: no 'ghost' in the stage's /etc/passwd"):
        await _build(tmp_path, store, f"FROM {DEMO}\nCOPY --chown=ghost app /app\n")
    with pytest.raises(DockerfileError, match="from a URL is not supported"):
        await _build(tmp_path, store, f"FROM {DEMO}\nADD https://example.com/x /x\n")
    with pytest.raises(DockerfileError, match="several sources needs a destination ending"):
        await _build(tmp_path, store, f"FROM {DEMO}\nCOPY app/main.sh app/keep.log /x\n")
    assert [n for n in os.listdir(store.build_dir) if not n.endswith(".lock")] == []


# ---- the REST API: the context uploaded as a tar ------------------------------------------

async def test_a_build_over_rest_streams_steps_and_refuses_a_hostile_context(
        tmp_path: Path, store: ImageStore) -> None:
    root = _context(tmp_path)
    (root / "Dockerfile").write_text(f"FROM {DEMO}\nCOPY app /app\n")
    upload = io.BytesIO()
    pack_context(root, "Dockerfile", upload)
    async with Runtime(data_dir=tmp_path / "state", images=store) as rt:
        transport = httpx.ASGITransport(app=create_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://kelpie/v1") as api:
            reply = await api.post("/builds", params={"tag": ["local/rest:1"]},
                                   content=upload.getvalue(),
                                   headers={"Accept": NDJSON, "Content-Type": TAR})
            lines = [json.loads(line) for line in reply.text.splitlines()]
            assert [line["kind"] for line in lines[:-1]] == ["step", "step"]
            assert lines[-1]["type"] == "result"
            assert lines[-1]["image"]["tags"] == ["docker.io/local/rest:1"]
            assert rt.images.resolve("local/rest:1").digest == lines[-1]["image"]["digest"]

            evil = io.BytesIO()
            with tarfile.open(fileobj=evil, mode="w") as tar:
                tar.addfile(tarfile.TarInfo("../outside"))
            reply = await api.post("/builds", content=evil.getvalue(),
                                   headers={"Content-Type": TAR})
            assert reply.status_code == 400 and "outside" in reply.text
            reply = await api.post("/builds", params={"tag": ["Not A Tag!"]}, content=b"x",
                                   headers={"Content-Type": TAR})
            assert reply.status_code == 400
    assert not (tmp_path / "outside").exists()


# ---- the layer of a RUN step, made by the agent ----------------------------------------

async def test_the_agent_makes_the_layer_of_what_changed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("etc", "app/old/deep", "keep"):
        (root / d).mkdir(parents=True)
    for name, data in (("etc/hosts", "a"), ("app/edit", "v1"), ("app/old/deep/f", "x"),
                       ("keep/same", "s"), ("app/mode", "m")):
        (root / name).write_text(data)
    agent = AgentProcess(tmp_path / "agent.sock", "--root", str(root))
    try:
        client = await AgentClient.connect_unix(str(agent.sock), timeout=5)
        await client.hello(timeout=5)
        mark = await client.mark()
        shutil.rmtree(root / "app" / "old")
        (root / "app" / "edit").write_text("v2")
        (root / "app" / "mode").chmod(0o600)
        (root / "app" / "new").write_text("new")
        os.link(root / "app" / "new", root / "app" / "twin")
        (root / "app" / "ln").symlink_to("new")
        (root / "etc" / "hosts").write_text("written by the runtime: never in a layer")
        out = io.BytesIO()
        mark2, entries = await client.layer(mark, out)
        out.seek(0)
        with tarfile.open(fileobj=out) as tar:
            members = {m.name: m for m in tar.getmembers()}
            assert tar.extractfile(members["app/edit"]).read() == b"v2"  # type: ignore[union-attr]
        assert sorted(members) == ["app", "app/.wh.old", "app/edit", "app/ln", "app/mode",
                                   "app/new", "app/twin"]
        assert entries == len(members) and mark2 > mark
        assert members["app/mode"].mode == 0o600 and members["app/ln"].linkname == "new"
        assert {members["app/new"].islnk(), members["app/twin"].islnk()} == {True, False}
        path = tmp_path / "layer.tar"
        path.write_bytes(out.getvalue())
        assert check_layer(path) == len(members)

        empty = io.BytesIO()
        assert (await client.layer(mark2, empty))[1] == 0  # nothing changed since
        with pytest.raises(AgentRemoteError, match="is not the agent's last mark"):
            await client.layer(mark, io.BytesIO())
        await client.close()
    finally:
        agent.stop()


def _bad_tar(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tar:
        for member in members:
            tar.addfile(member)
    return path


def test_a_guests_layer_is_checked_before_it_is_kept(tmp_path: Path) -> None:
    device = tarfile.TarInfo("dev/evil")
    device.type = tarfile.CHRTYPE
    link = tarfile.TarInfo("a")
    link.type, link.linkname = tarfile.LNKTYPE, "etc/shadow"
    for members, problem in (
        ((tarfile.TarInfo("../escape"),), "contains '..'"),
        ((device,), "it is a device node"),
        ((link,), "hard link to 'etc/shadow', which is not an entry before it"),
        ((tarfile.TarInfo("x"), tarfile.TarInfo("./x")), "the name comes twice"),
    ):
        with pytest.raises(UnsafeLayer, match=re.escape(problem)):
            check_layer(_bad_tar(tmp_path / "bad.tar", *members))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UnsafeLayer, match="not a tar archive"):
        check_layer(tmp_path / "junk.tar")
