"""What the operator lets agents do through ``kelpie mcp``: how many sandboxes, how big,
from which images or templates, and with which network."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from kelpie.api import MAX_EGRESS_RULES

OWNER_LABEL = "kelpie.mcp"
"""The label on every sandbox made through the MCP server: it acts on those only."""


class PolicyError(Exception):
    """A request the operator's policy refuses: what was asked and what is allowed."""


@dataclass(frozen=True)
class McpPolicy:
    """Limits on what an agent may do (the operator's ``kelpie mcp`` options)."""

    max_sandboxes: int = 4
    """Sandboxes made through the server that may exist at once (forks count)."""
    max_memory_mib: int = 2048
    """The most memory one sandbox may have."""
    default_memory_mib: int = 512
    images: Sequence[str] = field(default=("*",))
    """Images and templates an agent may start from (shell patterns: ``python:*``)."""
    network: str = "none"
    """The network of every sandbox the server makes: none, nat or policy."""
    allow: Sequence[str] = ()
    """Egress rules with ``network=policy`` (``pypi.org:443``...)."""
    max_output_bytes: int = 1 << 20
    """The most of a command's stdout (and of its stderr) a tool result carries."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_sandboxes < 1:
            problems.append(f"max_sandboxes is {self.max_sandboxes}; it must be at least 1")
        if not 0 < self.default_memory_mib <= self.max_memory_mib:
            problems.append(f"default memory {self.default_memory_mib} MiB must be between 1 "
                            f"and the maximum, {self.max_memory_mib} MiB")
        if self.network not in ("none", "nat", "policy"):
            problems.append(f"network {self.network!r} is not none, nat or policy")
        if self.allow and self.network != "policy":
            problems.append("egress rules (--allow) need --network policy")
        if len(self.allow) > MAX_EGRESS_RULES:
            problems.append(f"{len(self.allow)} egress rules; at most {MAX_EGRESS_RULES}")
        if problems:
            raise ValueError("; ".join(problems))

    def check_source(self, image: str | None, template: str | None) -> None:
        """Refuse an image or template outside the allowed patterns."""
        if (image is None) == (template is None):
            raise PolicyError("give exactly one of image and template")
        source = image if image is not None else template
        assert source is not None
        if not any(fnmatch.fnmatchcase(source, pattern) for pattern in self.images):
            kind = "image" if image is not None else "template"
            raise PolicyError(f"{kind} {source!r} is not allowed here; the operator allows "
                              f"{', '.join(self.images)}")

    def memory(self, requested: int | None) -> int:
        """The memory to give a new sandbox (MiB), within the limit."""
        if requested is None:
            return self.default_memory_mib
        if not 0 < requested <= self.max_memory_mib:
            raise PolicyError(f"memory {requested} MiB is over the operator's limit of "
                              f"{self.max_memory_mib} MiB per sandbox")
        return requested

    def check_room(self, existing: int, more: int) -> None:
        """Refuse ``more`` sandboxes when ``existing`` ones leave no room for them."""
        if existing + more > self.max_sandboxes:
            raise PolicyError(f"the operator allows at most {self.max_sandboxes} sandboxes at "
                              f"once and {existing} exist: remove one first")
