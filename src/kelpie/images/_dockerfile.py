"""Dockerfiles: parsed (by ``e2b-dockerfile-utils``, a port of BuildKit's own parser and
word lexer), checked instruction by instruction, split into stages.

What the parser leaves to its caller is here: which flags each instruction takes, how many
arguments, the stage structure (``ARG`` before the first ``FROM``, ``AS name``), and
variable substitution with Docker's rules (the builder expands ``$VAR`` in ``ADD``,
``COPY``, ``ENV``, ``EXPOSE``, ``FROM``, ``LABEL``, ``STOPSIGNAL``, ``USER``, ``VOLUME`` and
``WORKDIR``; ``RUN``, ``CMD`` and ``ENTRYPOINT`` are left to the shell). A Dockerfile is a
client's input: every problem is a :class:`DockerfileError` naming the line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from e2b_dockerfile_utils import (
    DockerfileInstruction,
    DockerfileSyntaxError,
    ShellLex,
    parse_dockerfile_ast,
)

from kelpie.images._errors import ImageError

MAX_DOCKERFILE_BYTES = 1 << 20
"""A Dockerfile larger than this is refused (BuildKit's own limit is about 1 MiB too)."""

FLAGS: dict[str, frozenset[str]] = {
    "FROM": frozenset({"platform"}),
    "RUN": frozenset({"network"}),
    "COPY": frozenset({"from", "chown", "chmod", "link"}),
    "ADD": frozenset({"chown", "chmod", "link"}),
}
"""The flags each instruction takes (the others take none)."""

SUPPORTED = frozenset({
    "FROM", "ARG", "ENV", "LABEL", "WORKDIR", "USER", "RUN", "COPY", "ADD", "CMD",
    "ENTRYPOINT", "EXPOSE", "SHELL", "VOLUME", "STOPSIGNAL", "MAINTAINER",
})
UNSUPPORTED = {
    "ONBUILD": "ONBUILD triggers are not supported by kelpie build",
    "HEALTHCHECK": "HEALTHCHECK is not supported by kelpie build (Kelpie runs no health "
                   "checks)",
}


class DockerfileError(ImageError):
    """A Dockerfile Kelpie cannot build: its line and what is wrong."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"Dockerfile line {line}: {message}" if line else
                         f"Dockerfile: {message}")
        self.line = line


@dataclass(frozen=True)
class Instruction:
    """One instruction, flags parsed, arguments not yet expanded."""

    name: str
    args: tuple[str, ...]
    flags: Mapping[str, str]
    json: bool
    line: int
    original: str
    heredoc: str | None = None
    """The body of ``RUN <<EOF``: the whole script."""


@dataclass
class Stage:
    """One ``FROM`` and the instructions up to the next."""

    index: int
    base: str
    """The ``FROM`` argument, not yet expanded: an image, an earlier stage or ``scratch``."""
    name: str | None
    platform: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    """A parsed Dockerfile: its global ``ARG`` (name, default) pairs and its stages."""

    args: list[tuple[str, str | None]]
    stages: list[Stage]
    escape: str

    def stage(self, ref: str, before: int, line: int) -> Stage:
        """The stage named ``ref`` (a name or an index) defined before stage ``before``."""
        found = self.find(ref, before)
        if found is not None:
            return found
        raise DockerfileError(line, f"no stage {ref!r} before this one (stages are named "
                                    "with FROM ... AS NAME or counted from 0)")

    def find(self, ref: str, before: int) -> Stage | None:
        """The stage named ``ref`` defined before stage ``before``, if there is one."""
        for stage in self.stages[:before]:
            if stage.name == ref.lower() or str(stage.index) == ref:
                return stage
        return None


def parse_dockerfile(text: str) -> Dockerfile:
    """Parse and check ``text`` (see the module docstring)."""
    if len(text.encode()) > MAX_DOCKERFILE_BYTES:
        raise DockerfileError(0, f"it is {len(text.encode())} bytes; at most "
                                 f"{MAX_DOCKERFILE_BYTES} are accepted")
    try:
        tree = parse_dockerfile_ast(text)
    except (DockerfileSyntaxError, ValueError) as exc:
        found = re.match(r"Dockerfile parse error on line (\d+): (.*)", str(exc), re.S)
        if found:
            raise DockerfileError(int(found[1]), found[2]) from None
        raise DockerfileError(0, str(exc)) from None
    result = Dockerfile(args=[], stages=[], escape=tree.escape_token)
    for raw in tree.instructions:
        instruction = _instruction(raw)
        if instruction.name == "FROM":
            result.stages.append(_stage(instruction, len(result.stages)))
        elif not result.stages:
            if instruction.name != "ARG":
                raise DockerfileError(instruction.line, f"{instruction.name} before the "
                                      "first FROM (only ARG may come before it)")
            result.args.extend(arg_pairs(instruction))
        else:
            result.stages[-1].instructions.append(instruction)
    if not result.stages:
        raise DockerfileError(0, "no FROM instruction: a Dockerfile starts from an image")
    names = [s.name for s in result.stages if s.name]
    for name in names:
        if names.count(name) > 1:
            raise DockerfileError(0, f"two stages are named {name!r}")
    return result


def _instruction(raw: DockerfileInstruction) -> Instruction:
    name, line = raw.name.upper(), raw.start_line
    if name in UNSUPPORTED:
        raise DockerfileError(line, UNSUPPORTED[name])
    if name not in SUPPORTED:
        raise DockerfileError(line, f"unknown instruction {raw.name!r}")
    flags: dict[str, str] = {}
    allowed = FLAGS.get(name, frozenset())
    for flag in raw.flags:
        key, has_value, value = flag.removeprefix("--").partition("=")
        if key not in allowed:
            offered = ", ".join(f"--{f}" for f in sorted(allowed)) or "none"
            raise DockerfileError(line, f"{name} does not take --{key} here (it takes: "
                                        f"{offered})")
        flags[key] = value if has_value else "true"
    heredoc = None
    if raw.heredocs:
        if name != "RUN" or len(raw.heredocs) != 1 or len(raw.args) != 1:
            raise DockerfileError(line, "here-documents are supported only as a whole RUN "
                                        "script (RUN <<EOF ... EOF)")
        heredoc = raw.heredocs[0].content
    if not raw.args and name not in {"CMD", "ENTRYPOINT"}:
        raise DockerfileError(line, f"{name} needs an argument")
    return Instruction(name, tuple(raw.args), flags, raw.json, line, raw.original, heredoc)


def _stage(instruction: Instruction, index: int) -> Stage:
    args = instruction.args
    if len(args) == 3 and args[1].lower() == "as":
        name = args[2].lower()
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise DockerfileError(instruction.line, f"stage name {args[2]!r} is not "
                                  "allowed (letters, digits, '-', '_' and '.')")
    elif len(args) == 1:
        name = None
    else:
        raise DockerfileError(instruction.line, "FROM takes IMAGE [AS NAME]")
    return Stage(index, args[0], name, instruction.flags.get("platform"), instruction.line)


def arg_pairs(instruction: Instruction) -> list[tuple[str, str | None]]:
    """``ARG NAME[=DEFAULT] ...`` as (name, default) pairs (the default not expanded)."""
    pairs: list[tuple[str, str | None]] = []
    for word in instruction.args:
        key, has_default, default = word.partition("=")
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise DockerfileError(instruction.line, f"ARG name {key!r} is not a variable "
                                  "name (letters, digits and '_')")
        pairs.append((key, default if has_default else None))
    return pairs


class Words:
    """Docker's variable substitution and quote removal for one set of variables."""

    def __init__(self, escape: str, variables: Mapping[str, str]) -> None:
        self._lex = ShellLex(escape, env=dict(variables), skip_unset_env=False)

    def word(self, text: str, line: int) -> str:
        """``text`` as one word: variables substituted, quotes and escapes removed."""
        try:
            return self._lex.process_word(text)
        except ValueError as exc:
            raise DockerfileError(line, str(exc)) from None

    def words(self, text: str, line: int) -> list[str]:
        """``text`` split into words as a shell would, each processed as :meth:`word`."""
        try:
            return self._lex.process_words(text)
        except ValueError as exc:
            raise DockerfileError(line, str(exc)) from None


def key_values(instruction: Instruction, words: Words) -> list[tuple[str, str]]:
    """The pairs of ``ENV`` or ``LABEL`` (``K=V ...`` or the legacy ``K V``), expanded
    with the variables from before the instruction."""
    args = instruction.args
    if len(args) % 3:
        raise DockerfileError(instruction.line, f"{instruction.name} takes KEY=VALUE pairs")
    pairs = []
    for i in range(0, len(args), 3):
        key = words.word(args[i], instruction.line)
        if not key:
            raise DockerfileError(instruction.line, f"{instruction.name} has an empty name")
        pairs.append((key, words.word(args[i + 1], instruction.line)))
    return pairs
