"""Unit tests of the agent wire format: framing, resynchronisation, request schemas."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies

from kelpie import protocol
from kelpie.protocol import FrameDecoder, FrameType, Garbage, ProtocolError


def decode_all(data: bytes, *, step: int | None = None) -> list[protocol.Frame | Garbage]:
    """Feed ``data`` (in ``step``-sized pieces) and collect everything decoded."""
    decoder = FrameDecoder()
    items: list[protocol.Frame | Garbage] = []
    step = step or len(data) or 1
    for start in range(0, len(data), step):
        decoder.feed(data[start : start + step])
        items.extend(decoder.frames())
    return items


def frames_only(items: list[protocol.Frame | Garbage]) -> list[protocol.Frame]:
    return [item for item in items if isinstance(item, protocol.Frame)]


def test_header_layout_is_documented_struct() -> None:
    frame = protocol.encode_frame(FrameType.STDOUT, 0x01020304, b"abc")
    assert frame[:4] == protocol.MAGIC
    assert frame[4:8] == (3).to_bytes(4, "big")
    assert frame[8] == FrameType.STDOUT
    assert frame[9:13] == bytes([1, 2, 3, 4])
    assert frame[13:] == b"abc"
    assert protocol.HEADER_SIZE == 13


def test_round_trip_whole_and_byte_by_byte() -> None:
    sent = [
        protocol.encode_json(FrameType.REQUEST, 1, {"op": "ping"}),
        protocol.encode_frame(FrameType.STDIN, 7, b"\x00" * 1000),
        protocol.encode_frame(FrameType.STDIN, 7, b""),
        protocol.encode_frame(FrameType.FILE_DATA, 9, bytes(range(256)) * 1024),
    ]
    wire = b"".join(sent)
    for step in (None, 1, 13, 4096):
        frames = decode_all(wire, step=step)
        assert all(isinstance(f, protocol.Frame) for f in frames), step
        assert [(f.ftype, f.request_id) for f in frames_only(frames)] == [
            (FrameType.REQUEST, 1),
            (FrameType.STDIN, 7),
            (FrameType.STDIN, 7),
            (FrameType.FILE_DATA, 9),
        ]
    decoded = frames_only(decode_all(wire))
    assert decoded[0].json() == {"op": "ping"}
    assert decoded[2].payload == b""
    assert decoded[3].payload == bytes(range(256)) * 1024


def test_encode_rejects_oversized_payload_and_bad_values() -> None:
    protocol.encode_frame(FrameType.STDOUT, 1, b"x" * protocol.MAX_FRAME_PAYLOAD)
    with pytest.raises(ValueError, match="MAX_FRAME_PAYLOAD"):
        protocol.encode_frame(FrameType.STDOUT, 1, b"x" * (protocol.MAX_FRAME_PAYLOAD + 1))
    with pytest.raises(ValueError):
        protocol.encode_frame(99, 1, b"")
    with pytest.raises(ValueError):
        protocol.encode_frame(FrameType.STDOUT, -1, b"")
    with pytest.raises(ValueError):
        protocol.encode_json(FrameType.STDOUT, 1, {})


def test_random_garbage_then_valid_frame_resynchronises() -> None:
    rng = random.Random(1234)
    garbage = bytes(rng.getrandbits(8) for _ in range(5000)).replace(protocol.MAGIC, b"")
    valid = protocol.encode_json(FrameType.REQUEST, 5, {"op": "ping"})
    for step in (None, 1, 100):
        items = decode_all(garbage + valid, step=step)
        frames = frames_only(items)
        assert len(frames) == 1
        assert frames[0].request_id == 5
        skipped = sum(item.skipped for item in items if isinstance(item, Garbage))
        assert skipped == len(garbage)


def test_oversized_header_is_skipped() -> None:
    bogus = protocol.HEADER.pack(
        protocol.MAGIC, protocol.MAX_FRAME_PAYLOAD + 1, FrameType.REQUEST, 3
    )
    valid = protocol.encode_json(FrameType.REQUEST, 4, {"op": "ping"})
    items = decode_all(bogus + valid)
    assert isinstance(items[0], Garbage)
    assert "exceeds the maximum" in items[0].reason
    assert [f.request_id for f in frames_only(items)] == [4]


def test_unknown_frame_type_is_skipped() -> None:
    bogus = protocol.HEADER.pack(protocol.MAGIC, 0, 200, 3)
    valid = protocol.encode_frame(FrameType.STDIN, 4, b"hi")
    items = decode_all(bogus + valid)
    assert isinstance(items[0], Garbage)
    assert "unknown frame type 200" in items[0].reason
    assert frames_only(items)[0].payload == b"hi"


def test_split_magic_marker_is_kept() -> None:
    valid = protocol.encode_frame(FrameType.STDIN, 4, b"hi")
    decoder = FrameDecoder()
    decoder.feed(b"junk" + valid[:2])
    first = list(decoder.frames())
    assert len(first) == 1
    assert isinstance(first[0], Garbage)
    assert first[0].skipped == 4
    assert decoder.buffered == 2
    decoder.feed(valid[2:])
    assert list(decoder.frames()) == [protocol.Frame(FrameType.STDIN, 4, b"hi")]


def test_partial_frame_waits_and_reset_forgets() -> None:
    valid = protocol.encode_frame(FrameType.STDIN, 4, b"hello")
    decoder = FrameDecoder()
    decoder.feed(valid[:-1])
    assert list(decoder.frames()) == []
    decoder.reset()
    decoder.feed(valid)
    assert list(decoder.frames()) == [protocol.Frame(FrameType.STDIN, 4, b"hello")]


JSON_VALUES = strategies.recursive(
    strategies.none()
    | strategies.booleans()
    | strategies.integers()
    | strategies.floats(allow_nan=False)
    | strategies.text(),
    lambda inner: strategies.lists(inner, max_size=4)
    | strategies.dictionaries(strategies.text(), inner, max_size=4),
    max_leaves=20,
)


@hypothesis.given(strategies.dictionaries(strategies.text(), JSON_VALUES, max_size=6))
def test_json_messages_are_what_json_makes_and_reads(message: dict[str, Any]) -> None:
    """The codec on json's C half gives json's own text and values, both ways."""
    frame = protocol.encode_json(FrameType.REPLY, 7, message)
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    assert frame == protocol.encode_frame(FrameType.REPLY, 7, text.encode())
    assert protocol.decode_json(text.encode()) == json.loads(text) == message
    spaced = json.dumps(message, indent=1)
    assert protocol.decode_json(f" \n{spaced}\t ".encode()) == message


@hypothesis.given(strategies.text(alphabet='{}[]",:0123456789.-+eEtrufalsnNI \\\n', max_size=24))
def test_malformed_json_is_refused_with_json_s_own_message(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except ValueError as exc:
        with pytest.raises(ProtocolError, match="not valid UTF-8 JSON") as info:
            protocol.decode_json(text.encode())
        assert info.value.message.endswith(str(exc))
    else:
        if isinstance(expected, dict):
            assert protocol.decode_json(text.encode()) == expected


def test_json_codec_needs_no_json_module_until_the_input_is_malformed() -> None:
    """The guest agent imports the protocol at boot: json (and re) stay out until needed."""
    code = (
        "import sys\n"
        "import protocol as p\n"  # as the guest imports it: no kelpie package around it
        "p.decode_json(p.encode_json(3, 1, {'a': [1.5, None, 'x']})[13:])\n"
        "print('json' in sys.modules, 're' in sys.modules)\n"
        "try:\n"
        "    p.decode_json(b'[1, 2')\n"
        "except p.ProtocolError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(protocol.__file__).parent)},
    )
    assert done.stdout.splitlines() == [
        "False False",
        "payload is not valid UTF-8 JSON: Expecting ',' delimiter: line 1 column 6 (char 5)",
    ]


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe", b"not json", b"[1, 2]", b'"text"', b'{"a":' + b"[" * 100_000],
)
def test_decode_json_rejects_non_objects(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_json(payload)
    assert info.value.code == "EPROTO"


def test_parse_request_fills_defaults() -> None:
    op, fields = protocol.parse_request({"op": "exec", "argv": ["true"], "extra": 1})
    assert op == "exec"
    assert fields == {
        "argv": ["true"],
        "env": {},
        "cwd": "/",
        "user": None,
        "stdin": False,
        "timeout": None,
        "pty": False,
        "rows": 24,
        "cols": 80,
        "replay": 0,
    }
    # Mutable defaults are copies.
    fields["env"]["X"] = "1"
    assert protocol.parse_request({"op": "exec", "argv": ["true"]})[1]["env"] == {}
    keep = protocol.parse_request({"op": "sweep"})[1]["keep"]
    keep.append(1)
    assert protocol.parse_request({"op": "sweep"})[1]["keep"] == []


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({}, 'no "op"'),
        ({"op": "frobnicate"}, "unknown op 'frobnicate'"),
        ({"op": "exec"}, "missing required field 'argv'"),
        ({"op": "exec", "argv": []}, "non-empty list"),
        ({"op": "exec", "argv": ["x"], "env": {"A": 1}}, "field 'env'"),
        ({"op": "exec", "argv": ["x"], "cwd": "relative"}, "absolute path"),
        ({"op": "exec", "argv": ["x"], "rows": 0}, "field 'rows'"),
        ({"op": "exec", "argv": ["x"], "timeout": True}, "field 'timeout'"),
        ({"op": "stat", "path": "etc"}, "absolute path"),
        ({"op": "hello", "version": "1"}, "field 'version'"),
        ({"op": "resync", "entropy": "zz"}, "hex string"),
        ({"op": "signal", "target": 1, "signum": -9}, "field 'signum'"),
    ],
)
def test_parse_request_errors_name_the_problem(message: dict[str, object], fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(message)
    assert fragment in info.value.message
    assert info.value.code == "EPROTO"


def test_every_op_has_a_schema_with_known_checks() -> None:
    assert set(protocol.REQUEST_FIELDS) == {
        "hello",
        "ping",
        "exec",
        "attach",
        "signal",
        "resize",
        "cancel",
        "read_file",
        "write_file",
        "stat",
        "list",
        "mkdir",
        "remove",
        "resync",
        "usage",
        "processes",
        "grow_fs",
        "walk",
        "sweep",
        "mark",
        "layer",
        "shutdown",
    }
    for fields in protocol.REQUEST_FIELDS.values():
        for check, default in fields.values():
            if default is not protocol.REQUIRED:
                assert check(default), (check, default)


def test_frame_type_names_and_directions() -> None:
    assert FrameType.name(FrameType.FILE_DATA) == "FILE_DATA"
    assert FrameType.name(42) == "type 42"
    assert FrameType.HOST_TO_AGENT | FrameType.AGENT_TO_HOST == FrameType.ALL
