"""kelpie build against real QEMU VMs (the demo image: busybox): a multi-stage Dockerfile
whose RUN steps make files with the base image's own tools, COPY --from, ENV, USER,
WORKDIR and a file deleted in a later step, a background process that the next step must
not see (the agent's sweep); the image runs, ``umoci unpack`` of it gives
the tree Kelpie's own rootfs has, the second build is all cache (no VM, same digest), and
hostile RUN steps (a fork bomb, a full disk, a device node) fail clearly within the step
timeout."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from conftest import real_part_missing
from kelpie.api import BuildEvent
from kelpie.guestkit import GuestKit
from kelpie.images import ImageStore, StoredImage, rootfs_dir
from kelpie.runtime import Runtime
from kelpie.runtime._build import BuildError
from test_cli_e2e import DEMO
from test_images_umoci import describe
from vm_fixtures import demo_image_store, kelpie_state_dir, qemu_runtime

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

DOCKERFILE = f"""\
ARG GREETING=hello
FROM {DEMO} AS gen
ARG GREETING
WORKDIR /work
RUN seq 1 5 > numbers && echo "$GREETING" > greeting && ln -s numbers link \\
    && mkdir -p sub && touch sub/a sub/b
RUN rm sub/a && chmod 600 greeting
RUN sleep 1000 > /dev/null 2>&1 &
RUN for p in /proc/[0-9]*; do if grep -q '^sleep' $p/cmdline 2>/dev/null; then \
      echo "the last RUN's process outlived it" >&2; exit 1; fi; done

FROM {DEMO}
ENV APP=/app MODE=test
COPY --from=gen /work /app
COPY --chown=1000:1000 hello.sh /app/bin/
WORKDIR /app
RUN busybox chown 1000:1000 /app && rm /etc/os-release
USER 1000:1000
RUN id -u > uid && echo "$MODE $GREETING" > mode
CMD ["sh", "/app/bin/hello.sh"]
"""
RUNS = 6
"""RUN steps in DOCKERFILE."""


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    yield from kelpie_state_dir("build")


@pytest.fixture(scope="module")
def store(state_dir: Path) -> ImageStore:
    return demo_image_store(state_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(guestkit: GuestKit, state_dir: Path, store: ImageStore,
                  ) -> AsyncIterator[Runtime]:
    async with qemu_runtime(state_dir, store, guestkit) as rt:
        yield rt


@pytest.fixture(scope="module")
def context(state_dir: Path) -> Path:
    root = state_dir / "context"
    root.mkdir()
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "hello.sh").write_text('echo "hello from $APP as $(id -u)"\n')
    return root


async def _build(rt: Runtime, context: Path, **options: object,
                 ) -> tuple[StoredImage, list[BuildEvent]]:
    events: list[BuildEvent] = []
    image = await rt.build(context, progress=events.append, **options)
    return image, events


async def test_a_multi_stage_build_runs_and_matches_umoci(
        runtime: Runtime, context: Path, store: ImageStore, state_dir: Path) -> None:
    image, events = await _build(runtime, context, tag=["local/built:1"])
    assert [e for e in events if e.kind == "note" and e.text.startswith("booting")] != []
    output = "".join(e.text for e in events if e.kind == "output")
    assert output == ""  # the RUN steps print nothing; their files are checked below
    assert not await runtime.list_sandboxes(all=True)  # the build's VMs are gone

    await runtime.create(name="built", backend="qemu", image="local/built:1")
    ran = await runtime.exec("built", ["sh", "-c", (
        "cat uid mode; cat /app/numbers | wc -l; ls /app/sub; stat -c '%a %u' "
        "/app/greeting /app/bin/hello.sh; readlink /app/link; test -e /etc/os-release "
        "|| echo gone; sh /app/bin/hello.sh")])
    assert ran.stdout.decode().split("\n") == [
        "1000", "test ", "5", "b", "600 0", "644 1000", "numbers", "gone",
        "hello from /app as 1000", ""], ran.stderr
    await runtime.remove("built", force=True)

    umoci = shutil.which("umoci")
    if umoci is None:
        real_part_missing("umoci is not installed (apt-get install umoci)")
    layout = _oci_layout(store, image, state_dir / "layout")
    bundle = state_dir / "bundle"
    await asyncio.to_thread(subprocess.run, [umoci, "unpack", "--image", f"{layout}:built",
                                             str(bundle)], check=True, capture_output=True,
                            timeout=300)
    ours = describe(rootfs_dir(store, image))
    theirs = describe(bundle / "rootfs")
    # Kelpie's rootfs adds what every guest needs when the image lacks it
    added = {"proc", "sys", "dev", "etc/hosts", "etc/resolv.conf"}
    assert {p: v for p, v in ours.items() if p not in added} == theirs


async def test_a_second_build_is_all_cache(runtime: Runtime, context: Path) -> None:
    first = await runtime.inspect_image("local/built:1")
    image, events = await _build(runtime, context, tag=["local/built:2"])
    assert image.digest == first.digest
    assert not [e for e in events if e.kind == "note" and e.text.startswith("booting")]
    assert sum(1 for e in events if e.cached) == RUNS
    other, _ = await _build(runtime, context, tag=["local/built:3"],
                            build_arg=["GREETING=bye"])
    assert other.digest != first.digest  # the ARG reaches the RUN steps: they ran again


async def test_hostile_run_steps_fail_within_the_step_timeout(
        runtime: Runtime, state_dir: Path) -> None:
    root = state_dir / "hostile"
    root.mkdir()
    (root / "Dockerfile").write_text(
        f"FROM {DEMO}\nRUN bomb() {{ bomb | bomb & }}; bomb; sleep 1000\n")
    # the step times out, or the bomb wedges the guest first: either way a clear failure
    with pytest.raises(BuildError, match=r"line 2: .*(did not finish within the step "
                                         r"timeout of 20 s|the build VM stopped answering)"):
        await runtime.build(root, step_timeout=20, memory_mib=256)
    (root / "Dockerfile").write_text(
        f"FROM {DEMO}\nRUN dd if=/dev/zero of=/fill bs=1M count=600\n")
    with pytest.raises(BuildError, match=r"line 2: .* failed with exit code 1") as failed:
        await runtime.build(root, step_timeout=300, disk_mib=256)
    assert "No space left on device" in failed.value.output
    (root / "Dockerfile").write_text(f"FROM {DEMO}\nRUN busybox mknod /evil c 1 3\n")
    with pytest.raises(BuildError, match=r"RUN at line 2 made a layer Kelpie refuses: .*"
                                         r"'evil': it is a device node"):
        await runtime.build(root)
    assert not await runtime.list_sandboxes(all=True)
    assert not [p for p in Path("/").iterdir() if p.name == "fill"]  # the host is untouched


def _oci_layout(store: ImageStore, image: StoredImage, root: Path) -> Path:
    """``image`` as an OCI image layout (tag ``built``), for umoci."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    digests = [image.digest, image.manifest.config.digest,
               *(layer.digest for layer in image.manifest.layers)]
    for digest in digests:
        shutil.copyfile(store.blobs.path(digest), blobs / digest.removeprefix("sha256:"))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": image.media_type, "digest": image.digest,
        "size": os.path.getsize(blobs / image.digest.removeprefix("sha256:")),
        "annotations": {"org.opencontainers.image.ref.name": "built"}}]}))
    return root
