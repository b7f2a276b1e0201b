"""The sandbox service: both implementations answer the same calls, and a daemon's errors
come back as the classes they were raised as."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from kelpie import ConfigError, InvalidStateError, KelpieError, SandboxNotFound
from kelpie.api import ErrorBody, TemplateCreate
from kelpie.client import DaemonClient, RemoteError, remote_error
from kelpie.runtime import Runtime, SandboxStateError
from kelpie.service import SandboxService
from test_daemon import mock_runtime

SERVICE_CALLS = sorted(name for name, value in vars(SandboxService).items()
                       if callable(value) and not name.startswith("_"))


@pytest.mark.parametrize("implementation", [Runtime, DaemonClient])
@pytest.mark.parametrize("call", SERVICE_CALLS)
def test_both_sides_offer_every_call(implementation: type, call: str) -> None:
    # mypy proves conformance (kelpie.service._protocol); this says which call is missing
    # when someone runs the tests without it.
    expected = inspect.signature(getattr(SandboxService, call))
    actual = inspect.signature(getattr(implementation, call))
    for name, parameter in expected.parameters.items():
        assert name in actual.parameters or parameter.kind is parameter.POSITIONAL_ONLY, (
            f"{implementation.__name__}.{call} has no parameter {name}")
    extra = [p for n, p in actual.parameters.items() if n not in expected.parameters
             and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert all(p.default is not p.empty for p in extra), (
        f"{implementation.__name__}.{call} needs arguments the service does not pass")


def test_the_service_covers_the_sandbox_api() -> None:
    assert {"create", "list_sandboxes", "inspect", "start", "stop", "kill", "pause", "resume",
            "set_network", "set_timeout", "remove", "events", "read_logs", "follow_logs",
            "exec", "exec_stream",
            "read_file", "read_file_stream", "write_file", "list_dir", "mkdir", "remove_path",
            "snapshot", "list_snapshots", "inspect_snapshot", "delete_snapshot", "restore",
            "restore_into", "create_template", "fork", "rename", "wait_main", "exec_detached",
            "list_images", "inspect_image", "watch_events", "stats", "stats_all", "processes",
            "remove_image", "pull_image", "push_image", "commit", "build"} == set(SERVICE_CALLS)


def _body(*types: str, message: str = "it went wrong", **extra: object) -> ErrorBody:
    return ErrorBody.model_validate({"type": types[0], "types": list(types),
                                     "message": message, **extra})


def test_a_remote_error_is_the_class_it_was_raised_as() -> None:
    error = remote_error(404, _body("SandboxNotFound", "SandboxError", "KelpieError",
                                    message="no sandbox named x"))
    assert isinstance(error, SandboxNotFound) and isinstance(error, RemoteError)
    assert isinstance(error, LookupError)  # SandboxNotFound's other base comes along
    assert str(error) == "no sandbox named x" and error.status == 404
    assert error.is_a("SandboxError") and not error.is_a("ConfigError")
    with pytest.raises(SandboxNotFound):
        raise error
    # one class per kind, so two errors of a kind share it
    assert type(error) is type(remote_error(404, _body("SandboxNotFound", "KelpieError")))


def test_a_remote_error_keeps_its_details() -> None:
    config = remote_error(400, _body("ConfigError", "KelpieError", problems=["cpus: 0"],
                                     retriable=True))
    assert isinstance(config, ConfigError) and isinstance(config, ValueError)
    assert config.problems == ("cpus: 0",) and config.retriable
    state = remote_error(409, _body("SandboxStateError", "InvalidStateError", "KelpieError",
                                    message="cannot start box: it is running"))
    assert isinstance(state, SandboxStateError) and isinstance(state, InvalidStateError)
    assert str(state) == "cannot start box: it is running"  # not the class's own __str__


def test_an_unknown_remote_error_is_its_nearest_known_ancestor() -> None:
    newer = remote_error(409, _body("SandboxBusyNewer", "InvalidStateError", "KelpieError"))
    assert isinstance(newer, InvalidStateError) and newer.type == "SandboxBusyNewer"
    assert newer.is_a("SandboxBusyNewer")
    unknown = remote_error(500, _body("Mystery", "KelpieError"))
    assert type(unknown) is RemoteError and isinstance(unknown, KelpieError)


async def test_a_template_is_made_from_its_one_request(tmp_path: Path) -> None:
    async with mock_runtime(tmp_path) as runtime:
        made = await runtime.create_template(TemplateCreate(name="tpl", env={"T": "1"}))
        assert made.name == "tpl" and made.template
        by_fields = await runtime.create_template(name="tpl2")  # in-process keywords
        assert by_fields.name == "tpl2"
        with pytest.raises(ConfigError, match="not both"):
            await runtime.create_template(TemplateCreate(name="tpl3"), name="tpl3")
        with pytest.raises(TypeError, match="needs the field"):
            await runtime.create_template(image="x")
        with pytest.raises(TypeError, match="unexpected TemplateCreate field"):
            await runtime.create_template(name="tpl4", volumes=[])
