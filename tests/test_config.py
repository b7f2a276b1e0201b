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
    MAX_PORTS,
    MAX_VCPUS,
    MIN_MEMORY_MIB,
    MIN_VCPUS,
    PortMapping,
)


def problems(**kwargs: object) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        VmConfig(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_defaults() -> None:
    config = VmConfig()
    assert (config.vcpus, config.memory_mib) == (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB) == (2, 512)
    assert config.network is NetworkMode.NONE
    assert config.mounts == () and dict(config.env) == {} and config.ports == ()


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
    assert "must be absolute" in problems(mounts=(Mount("rel/dir", "/x"),))[0]  # type: ignore[arg-type]


def test_mount_host_problems(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    # construction does not look at the host: a saved config loads after a share is gone
    config = VmConfig(mounts=(Mount(tmp_path, "/ok"), Mount(tmp_path / "gone", "/gone"),
                              Mount(a_file, "/file")))
    missing, not_dir = config.host_problems()
    assert missing.startswith("mounts[1].host_path") and "does not exist" in missing
    assert str(tmp_path / "gone") in missing
    assert not_dir.startswith("mounts[2].host_path") and "is not a directory" in not_dir
    assert VmConfig(mounts=(Mount(tmp_path, "/ok"),)).host_problems() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", PortMapping(8080, 80)),
        ("8080:80/tcp", PortMapping(8080, 80)),
        ("5353:53/udp", PortMapping(5353, 53, protocol="udp")),
        ("0.0.0.0:1:65535", PortMapping(1, 65535, host_ip="0.0.0.0")),
        ("10.1.2.3:443:8443/UDP", PortMapping(443, 8443, host_ip="10.1.2.3", protocol="udp")),
    ],
)
def test_port_parse(text: str, expected: PortMapping) -> None:
    parsed = PortMapping.parse(text)
    assert parsed == expected
    assert PortMapping.parse(str(parsed)) == parsed
    assert parsed.host_ip == expected.host_ip  # 127.0.0.1 unless given


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80", "is not a port mapping; use HOST:GUEST or IP:HOST:GUEST"),
        ("1:2:3:4", "is not a port mapping"),
        ("", "is not a port mapping"),
        ("http:80", "host port 'http' is not a number; give a number in 1..65535"),
        ("8080:", "guest port is missing"),
        ("0:80", "host port is 0; allowed range is 1..65535"),
        ("8080:65536", "guest port is 65536; allowed range is 1..65535"),
        ("8080:80/sctp", "protocol is 'sctp'; allowed: tcp, udp"),
        ("localhost:8080:80", "host IP 'localhost' is not an IPv4 address"),
        ("::1:8080:80", "is not a port mapping"),
        ("[::1]:8080:80", "IPv6 host addresses are not supported"),
        (":8080:80", "the IP before the host port is empty"),
        ("256.0.0.1:8080:80", "is not an IPv4 address"),
    ],
)
def test_port_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="invalid published port") as info:
        PortMapping.parse(text)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_port_parse_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        PortMapping.parse("a:b")
    assert len(info.value.problems) == 2


def test_ports_validated_in_config() -> None:
    found = problems(ports=(PortMapping(0, 80), PortMapping(80, 80, host_ip="::1"),
                            PortMapping(81, 80, protocol="icmp"), "8080:80"))
    assert found[0] == "ports[0]: host port is 0; allowed range is 1..65535"
    assert found[1].startswith("ports[1]: host IP '::1' is not an IPv4 address")
    assert found[2] == "ports[2]: protocol is 'icmp'; allowed: tcp, udp"
    assert found[3] == "ports[3] must be a PortMapping, got str; use PortMapping.parse('8080:80')"
    assert len(found) == 4
    (lone,) = problems(ports="8080:80")
    assert lone == "ports[0] must be a PortMapping, got str; use PortMapping.parse('8080:80')"


def test_port_limit() -> None:
    ports = [PortMapping(10000 + i, 80) for i in range(MAX_PORTS + 1)]
    assert "65 ports published; at most 64 allowed" in problems(ports=ports)
    assert len(VmConfig(ports=ports[:MAX_PORTS]).ports) == MAX_PORTS


def test_port_duplicates_and_overlaps() -> None:
    found = problems(ports=(
        PortMapping(8080, 80),
        PortMapping(8080, 81),                      # same host side as ports[0]
        PortMapping(8080, 80, protocol="udp"),      # fine: another protocol
        PortMapping(8080, 80, host_ip="10.0.0.1"),  # fine: another address
        PortMapping(8080, 82, host_ip="0.0.0.0"),   # every address, so also ports[0]'s
    ))
    assert found == (
        "ports[1]: host port 127.0.0.1:8080/tcp is already published by ports[0]",
        "ports[4]: host port 0.0.0.0:8080/tcp overlaps ports[0] (127.0.0.1:8080/tcp); "
        "0.0.0.0 covers every address",
    )
    # the same guest port on two host ports is fine
    assert len(VmConfig(ports=(PortMapping(1, 80), PortMapping(2, 80))).ports) == 2


def test_port_and_other_problems_listed_together() -> None:
    found = problems(vcpus=0, ports=(PortMapping(1, 0),))
    assert len(found) == 2


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
        .port(8080, 80)
        .port(5353, 53, host_ip="0.0.0.0", protocol="udp")
        .publish("127.0.0.1:8443:443")
        .publish(PortMapping(2222, 22))
        .build()
    )
    keywords = VmConfig(
        vcpus=4, memory_mib=1024, kernel=Path("/k"), initrd=Path("/i"), kernel_args=("quiet",),
        mounts=(Mount(Path("/host"), "/data", read_only=True),), env={"A": "1", "B": "2"},
        network=NetworkMode.NAT, hostname="h", image="alpine",
        ports=(PortMapping(8080, 80), PortMapping(5353, 53, "0.0.0.0", "udp"),
               PortMapping(8443, 443), PortMapping(2222, 22)),
    )
    assert built == keywords


def test_builder_port_problems_reported_on_build() -> None:
    builder = VmConfig.builder().vcpus(0).port(0, 80).port(1, 2).port(1, 3)
    with pytest.raises(ConfigError) as info:
        builder.build()
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="is not a port mapping"):
        VmConfig.builder().publish("8080")  # text is parsed at once


def test_builder_validates_on_build() -> None:
    builder = VmConfig.builder().vcpus(0).memory_mib(1)
    with pytest.raises(ConfigError) as info:
        builder.build()
    assert len(info.value.problems) == 2


def test_dict_round_trip() -> None:
    config = VmConfig(vcpus=3, env={"A": "b"}, mounts=(Mount(Path("/h"), "/g", True, "t"),),
                      ports=(PortMapping(8080, 80), PortMapping(53, 53, "0.0.0.0", "udp")))
    assert VmConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["ports"] == [
        {"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 80, "protocol": "tcp"},
        {"host_ip": "0.0.0.0", "host_port": 53, "guest_port": 53, "protocol": "udp"},
    ]


def test_dict_round_trip_is_json_ready() -> None:
    import json

    config = VmConfig(ports=(PortMapping(8080, 80),), mounts=(Mount(Path("/h"), "/g"),))
    assert VmConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_without_ports_loads() -> None:
    old = VmConfig(vcpus=3).to_dict()
    del old["ports"]  # a config saved before ports existed
    assert VmConfig.from_dict(old) == VmConfig(vcpus=3)


def test_from_dict_port_defaults_and_errors() -> None:
    loaded = VmConfig.from_dict({"ports": [{"host_port": 8080, "guest_port": 80}]})
    assert loaded.ports == (PortMapping(8080, 80, "127.0.0.1", "tcp"),)
    with pytest.raises(ConfigError) as info:
        VmConfig.from_dict({"ports": [{"host_port": 1}, "8080:80", {"host_port": 1,
                                                                    "guest_port": 2, "x": 3}]})
    assert [p.split(":")[0] for p in info.value.problems] == ["ports[0]", "ports[1]", "ports[2]"]
    assert "malformed entry" in info.value.problems[0]
    with pytest.raises(ConfigError, match="ports: expected a list"):
        VmConfig.from_dict({"ports": 5})
    with pytest.raises(ConfigError, match=r"ports\[0\]: host port is 0"):
        VmConfig.from_dict({"ports": [{"host_port": 0, "guest_port": 80}]})


def test_from_dict_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown field 'cpus'"):
        VmConfig.from_dict({"cpus": 2})
