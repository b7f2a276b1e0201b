"""Harbor runs tasks of its own format in Kelpie sandboxes (``-e
kelpie.harbor:KelpieEnvironment``) with its ``oracle`` agent, no model and no network
needed: one task from a prebuilt image (``docker_image``), one from an
``environment/Dockerfile`` (built with ``kelpie build``). Harbor (Python >= 3.12) runs
from the venv ``scripts/setup`` makes; the verifier's reward is read from Harbor's own
trial result."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import real_part_missing
from daemon_env import KelpieHome
from test_cli_e2e import DEMO
from vm_fixtures import demo_home

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
HARBOR = Path(os.environ.get("KELPIE_HARBOR_VENV", REPO / ".venv-harbor")) / "bin" / "harbor"
BASE = "local/harbor-base:1"
SOLVE = "#!/bin/sh\ncat /data/answer > /app/out 2>/dev/null || echo hello > /app/out\n"
TEST = ("#!/bin/sh\nif [ \"$(cat /app/out)\" = \"$EXPECTED\" ]; then echo 1; else echo 0; fi "
        "> /logs/verifier/reward.txt\n")


@pytest.fixture(scope="module")
def home(guestkit: object) -> Iterator[KelpieHome]:
    if not HARBOR.exists():
        real_part_missing(f"harbor is not installed at {HARBOR} (scripts/setup makes that "
                          "venv with python3.12)")
    for home in demo_home():
        # the demo image has a few of busybox's applets and no users: Harbor wants more
        context = home.root / "harbor-base"
        context.mkdir()
        (context / "Dockerfile").write_text(
            f"FROM {DEMO}\nRUN busybox --install -s /bin && "
            "echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd && "
            "echo 'root:x:0:' > /etc/group\n")
        built = home.kelpie("build", "-q", "-t", BASE, str(context))
        assert built.returncode == 0, built.stderr
        yield home


def _task(root: Path, expected: str, *, image: str | None = None,
          dockerfile: str | None = None) -> Path:
    (root / "solution").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "environment").mkdir()
    (root / "instruction.md").write_text("Write the answer into /app/out.\n")
    (root / "solution" / "solve.sh").write_text(SOLVE)
    (root / "tests" / "test.sh").write_text(TEST)
    for script in ("solution/solve.sh", "tests/test.sh"):
        (root / script).chmod(0o755)
    if dockerfile is not None:
        (root / "environment" / "Dockerfile").write_text(dockerfile)
    image_line = f'docker_image = "{image}"\n' if image else ""
    (root / "task.toml").write_text(
        'schema_version = "1.4"\n\n[verifier]\ntimeout_sec = 120.0\n'
        f'env = {{ EXPECTED = "{expected}" }}\n\n[agent]\ntimeout_sec = 120.0\n\n'
        f'[environment]\nbuild_timeout_sec = 600.0\nworkdir = "/app"\n{image_line}')
    return root


def _run(home: KelpieHome, task: Path, job: str) -> dict[str, object]:
    jobs = home.root / "harbor-jobs"
    env = {**home.env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run([str(HARBOR), "run", "-p", str(task), "-a", "oracle", "-e",
                           "kelpie.harbor:KelpieEnvironment", "-o", str(jobs),
                           "--job-name", job, "-y"],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    results = list((jobs / job).glob("*/result.json"))
    assert done.returncode == 0 and len(results) == 1, done.stdout + done.stderr
    result: dict[str, object] = json.loads(results[0].read_text())
    return result


def test_a_task_from_an_image_is_verified_in_a_sandbox(home: KelpieHome, tmp_path: Path
                                                       ) -> None:
    result = _run(home, _task(tmp_path / "from-image", "hello", image=BASE), "image")
    assert result["exception_info"] is None, result["exception_info"]["exception_traceback"]
    assert result["verifier_result"] == {"rewards": {"reward": 1.0}}
    assert json.loads(home.kelpie("ps", "-a", "--json").stdout) == []  # stopped and removed


def test_a_task_from_a_dockerfile_is_built_and_verified(home: KelpieHome, tmp_path: Path
                                                        ) -> None:
    dockerfile = f"FROM {BASE}\nRUN mkdir -p /data && echo 42 > /data/answer\n"
    result = _run(home, _task(tmp_path / "from-dockerfile", "42", dockerfile=dockerfile),
                  "dockerfile")
    assert result["exception_info"] is None, result["exception_info"]["exception_traceback"]
    assert result["verifier_result"] == {"rewards": {"reward": 1.0}}
