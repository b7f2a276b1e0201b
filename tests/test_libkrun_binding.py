"""libkrun's ctypes binding against libkrun's own header (v1.19.0, vendored).

Every function the binding declares must be in ``libkrun.h`` with the same return type and
the same parameters, each of the ctypes type its C type calls for. A library that is
missing, or lacks a function, is a clear error; a failing call names its errno.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import pytest

from kelpie.backends.libkrun import FUNCTIONS, HEADER, LIBRARY_ENV, KrunError, Libkrun, find_library
from kelpie.vm import BackendUnavailable

C_TYPES = {
    "int32_t": ctypes.c_int32, "int": ctypes.c_int, "uint32_t": ctypes.c_uint32,
    "uint8_t": ctypes.c_uint8, "uint64_t": ctypes.c_uint64, "bool": ctypes.c_bool,
    "const char *": ctypes.c_char_p,
    "char *": ctypes.c_char_p,
    "const char *const []": ctypes.POINTER(ctypes.c_char_p),
}


def declarations() -> dict[str, tuple[str, list[str]]]:
    """Each ``krun_*`` function of the header: its return type and parameter types."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    found = {}
    for ret, name, params in re.findall(r"\b(int32_t|int)\s+(krun_\w+)\s*\(([^)]*)\)\s*;", text):
        types = []
        for param in (p.strip() for p in params.split(",")):
            if param in ("", "void"):
                continue
            array = param.endswith("[]")
            base = re.sub(r"\s*\w+\s*(\[\])?$", "", param)  # drop the parameter's name
            base = re.sub(r"\s+", " ", base).replace(" *", " *").strip()
            base = re.sub(r"\*\s*const$", "*const", base)
            types.append(f"{base} []" if array else base)
        found[name] = (ret, types)
    return found


def test_the_vendored_header_is_libkruns_of_the_version_we_name() -> None:
    text = HEADER.read_text()
    assert "github.com/containers/libkrun, tag v1.19.0" in text
    assert len(declarations()) >= 60  # "about 65 krun_* functions"
    assert "krun_start_enter" in declarations()


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_each_binding_matches_the_header(name: str) -> None:
    declared = declarations()
    assert name in declared, f"{name} is not in libkrun.h v1.19.0"
    ret, params = declared[name]
    restype, argtypes = FUNCTIONS[name]
    assert C_TYPES[ret] is restype
    assert len(params) == len(argtypes), (name, params)
    for c_type, ctypes_type in zip(params, argtypes, strict=True):
        assert c_type in C_TYPES, f"{name}: no mapping for C type {c_type!r}"
        expected = C_TYPES[c_type]
        assert expected is ctypes_type or expected == ctypes_type, (name, c_type, ctypes_type)


def test_the_header_has_no_pause_or_snapshot() -> None:
    """Why the backend raises UnsupportedOperation for them: libkrun has no such API."""
    assert not [n for n in declarations() if re.search(r"pause|snapshot|restore|resume", n)]


def test_a_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match=f"{LIBRARY_ENV}=.* is not a file"):
        find_library({LIBRARY_ENV: str(tmp_path / "absent.so")})
    not_a_library = tmp_path / "libkrun.so"
    not_a_library.write_text("no ELF here")
    with pytest.raises(BackendUnavailable, match="cannot load libkrun"):
        Libkrun(str(not_a_library))


def _stand_in(tmp_path: Path, body: str) -> Path:
    """A shared library standing in for libkrun, compiled from C ``body``."""
    source, library = tmp_path / "stand_in.c", tmp_path / "libkrun-stand-in.so"
    source.write_text("#include <stdint.h>\n#include <stdbool.h>\n#include <errno.h>\n" + body)
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler to build a stand-in library: {exc}")
    return library


def test_a_library_missing_functions_is_refused_by_name(tmp_path: Path) -> None:
    library = _stand_in(tmp_path, "int32_t krun_create_ctx(void) { return 0; }\n")
    with pytest.raises(BackendUnavailable, match="missing krun_set_log_level"):
        Libkrun(str(library))


def test_calls_go_through_and_failures_name_their_errno(tmp_path: Path) -> None:
    stubs = "".join(
        f"int32_t {name}() {{ return 0; }}\n" for name in FUNCTIONS
        if name not in ("krun_create_ctx", "krun_set_root", "krun_set_env"))
    library = _stand_in(tmp_path, stubs + (
        "int32_t krun_create_ctx(void) { return 7; }\n"
        "int32_t krun_set_root(uint32_t ctx, const char *path) {"
        "  return path[0] == '/' ? 0 : -ENOENT; }\n"
        "int32_t krun_set_env(uint32_t ctx, const char *const envp[]) {"
        "  int n = 0; while (envp[n]) n++; return n == 2 ? 0 : -EINVAL; }\n"))
    krun = Libkrun(str(library))
    assert krun.call("krun_create_ctx") == 7
    assert krun.call("krun_set_root", 7, b"/srv/root") == 0
    with pytest.raises(KrunError, match=r"krun_set_root failed: No such file .*errno 2"):
        krun.call("krun_set_root", 7, b"relative")
    assert krun.call("krun_set_env", 7, Libkrun.strings(["A=1", "B=2"])) == 0
