from __future__ import annotations

from pathlib import Path

import pytest

from kelpie import ConfigError, Mount, NetworkMode, VmConfig
from kelpie.vm import (
    DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
    MAX_MEMORY_MIB,
    MAX_MOUNT_TAG_LENGTH,
    MAX_MOUNTS,
    MAX_PATH_LENGTH,
    MAX_VCPUS,
    MIN_MEMORY_MIB,
    MIN_VCPUS,
)


def problems(**kwargs: object) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        VmConfig(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_defaults() -> None:
    config = VmConfig()
    assert (config.vcpus, config.memory_mib) == (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB) == (2, 512)
    assert config.network is NetworkMode.NONE
    assert config.mounts == () and dict(config.env) == {}


@pytest.mark.parametrize("vcpus", [MIN_VCPUS, MAX_VCPUS])
def test_vcpus_bounds_accepted(vcpus: int) -> None:
    assert VmConfig(vcpus=vcpus).vcpus == vcpus


@pytest.mark.parametrize("vcpus", [0, MAX_VCPUS + 1, -1])
def test_vcpus_out_of_range(vcpus: int) -> None:
    (problem,) = problems(vcpus=vcpus)
    assert f"vcpus is {vcpus}" in problem and "1..32" in problem


@pytest.mark.parametrize("memory", [MIN_MEMORY_MIB, MAX_MEMORY_MIB])
def test_memory_bounds_accepted(memory: int) -> None:
    assert VmConfig(memory_mib=memory).memory_mib == memory


@pytest.mark.parametrize("memory", [127, 16385, 0])
def test_memory_out_of_range(memory: int) -> None:
    (problem,) = problems(memory_mib=memory)
    assert "128..16384" in problem


def test_non_integer_rejected() -> None:
    assert "must be an integer" in problems(vcpus="2")[0]
    assert "must be an integer" in problems(vcpus=True)[0]


def test_every_problem_listed_at_once() -> None:
    found = problems(vcpus=0, memory_mib=1, env={"1BAD": "x"}, hostname="-no-")
    assert len(found) == 4
    text = str(ConfigError(found))
    assert "4 problems" in text


@pytest.mark.parametrize("field", ["kernel", "initrd", "root_disk"])
def test_path_length_limit(field: str) -> None:
    kwargs: dict[str, object] = {field: Path("/" + "a" * MAX_PATH_LENGTH)}
    if field == "initrd":
        kwargs["kernel"] = Path("/k")
    found = problems(**kwargs)
    assert any(f"{field} is {MAX_PATH_LENGTH + 1} characters" in p for p in found)


def test_path_exactly_at_limit_is_fine() -> None:
    assert VmConfig(kernel=Path("/" + "a" * (MAX_PATH_LENGTH - 1))).kernel is not None


def test_paths_accept_strings() -> None:
    assert VmConfig(kernel="/boot/vmlinuz").kernel == Path("/boot/vmlinuz")  # type: ignore[arg-type]


def test_initrd_needs_kernel() -> None:
    assert "initrd is set but kernel is not" in problems(initrd=Path("/i"))[0]


def test_empty_image_rejected() -> None:
    assert "image is empty" in problems(image=" ")[0]


def test_mount_limit() -> None:
    mounts = [Mount(Path(f"/h{i}"), f"/g{i}") for i in range(MAX_MOUNTS + 1)]
    assert any("17 mounts given; at most 16" in p for p in problems(mounts=mounts))
    assert len(VmConfig(mounts=mounts[:MAX_MOUNTS]).mounts) == MAX_MOUNTS


def test_mount_tag_length() -> None:
    ok = Mount(Path("/h"), "/g", tag="t" * MAX_MOUNT_TAG_LENGTH)
    assert VmConfig(mounts=(ok,)).mount_tag(0) == "t" * 36
    bad = Mount(Path("/h"), "/g", tag="t" * (MAX_MOUNT_TAG_LENGTH + 1))
    assert "at most 36" in problems(mounts=(bad,))[0]


def test_mount_tag_characters_and_uniqueness() -> None:
    found = problems(mounts=(Mount(Path("/a"), "/x", tag="bad tag"),))
    assert "may only use letters" in found[0]
    found = problems(mounts=(Mount(Path("/a"), "/x", tag="t"), Mount(Path("/b"), "/y", tag="t")))
    assert "used by an earlier mount" in found[0]


def test_mount_guest_path_rules() -> None:
    assert "must be an absolute guest path" in problems(mounts=(Mount(Path("/a"), "rel"),))[0]
    assert "must not contain '..'" in problems(mounts=(Mount(Path("/a"), "/x/../y"),))[0]
    assert "must not be '/'" in problems(mounts=(Mount(Path("/a"), "/"),))[0]
    twice = (Mount(Path("/a"), "/x"), Mount(Path("/b"), "/x"))
    assert "mounted twice" in problems(mounts=twice)[0]


def test_mount_host_path_must_be_absolute() -> None:
    assert "must be absolute" in problems(mounts=(Mount(Path("rel"), "/x"),))[0]


@pytest.mark.parametrize("name", ["1X", "A-B", "", "A B", "Ä"])
def test_env_names_invalid(name: str) -> None:
    assert "env name" in problems(env={name: "v"})[0]


def test_env_value_nul() -> None:
    assert "without NUL" in problems(env={"A": "x\0y"})[0]


def test_env_valid_and_immutable() -> None:
    config = VmConfig(env={"_A1": "x", "PATH": "/bin"})
    with pytest.raises(TypeError):
        config.env["B"] = "y"  # type: ignore[index]


def test_network_mode() -> None:
    assert VmConfig(network="nat").network is NetworkMode.NAT  # type: ignore[arg-type]
    assert "allowed: none, nat" in problems(network="bridge")[0]


def test_hostname() -> None:
    assert VmConfig(hostname="box-1").hostname == "box-1"
    assert "not a valid host name" in problems(hostname="a" * 64)[0]


def test_kernel_args() -> None:
    assert "kernel_args[0]" in problems(kernel_args=("a\nb",))[0]


def test_frozen_and_evolve() -> None:
    config = VmConfig()
    with pytest.raises(AttributeError):
        config.vcpus = 4  # type: ignore[misc]
    assert config.evolve(vcpus=4).vcpus == 4
    with pytest.raises(ConfigError):
        config.evolve(vcpus=0)


def test_builder_matches_keywords() -> None:
    built = (
        VmConfig.builder()
        .vcpus(4)
        .memory_mib(1024)
        .kernel("/k", initrd="/i")
        .kernel_arg("quiet")
        .mount("/host", "/data", read_only=True)
        .env("A", "1")
        .envs({"B": "2"})
        .network("nat")
        .hostname("h")
        .image("alpine")
        .build()
    )
    keywords = VmConfig(
        vcpus=4, memory_mib=1024, kernel=Path("/k"), initrd=Path("/i"), kernel_args=("quiet",),
        mounts=(Mount(Path("/host"), "/data", read_only=True),), env={"A": "1", "B": "2"},
        network=NetworkMode.NAT, hostname="h", image="alpine",
    )
    assert built == keywords


def test_builder_validates_on_build() -> None:
    builder = VmConfig.builder().vcpus(0).memory_mib(1)
    with pytest.raises(ConfigError) as info:
        builder.build()
    assert len(info.value.problems) == 2


def test_dict_round_trip() -> None:
    config = VmConfig(vcpus=3, env={"A": "b"}, mounts=(Mount(Path("/h"), "/g", True, "t"),))
    assert VmConfig.from_dict(config.to_dict()) == config


def test_from_dict_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown field 'cpus'"):
        VmConfig.from_dict({"cpus": 2})
