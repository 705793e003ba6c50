"""What ``imgtriage inspect`` can be told: print the whole manifest as JSON, and whether to
check every file's sha256 while loading (``load_bundle(verify=...)``).

Example:
    >>> InspectConfig().verify, InspectConfig(no_verify=True).verify
    (True, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InspectConfig:
    """How a bundle is shown: the summary or the manifest as JSON, verified or not."""

    as_json: bool = field(default=False, metadata={
        "help": "Print the whole manifest as JSON.", "flag": "--json", "switch": True})
    no_verify: bool = field(default=False, metadata={
        "help": "Skip the sha256 checks.", "switch": True})

    @property
    def verify(self) -> bool:
        """Whether loading checks every file against its sha256."""
        return not self.no_verify
