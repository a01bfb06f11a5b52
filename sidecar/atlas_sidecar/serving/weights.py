"""Which weight version the sidecar serves, and which one a rollout last asked for.

The operator mounts a ConfigMap holding the version to serve; ``RolloutWeights`` asks
for one directly. A sidecar with a weights store installs them (``rolloutfiles.py``
follows the ConfigMap's three keys); one without records the requested version and
exposes it (GetStats, metrics), and serving stays as it started.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from atlas_sidecar.errors import RequestError
from atlas_sidecar.learning.versioned import BASE_VERSION

# The rollout ConfigMap's keys, the file names in its mounted directory: the same as the
# operator's (atlas_operator WEIGHT_VERSION_KEY, ...; tests/operator/test_contract.py),
# kept here because the sidecar does not import the operator. See rolloutfiles.py.
WEIGHT_VERSION_KEY = "weight-version"
CANARY_VERSION_KEY = "canary-version"
CANARY_FRACTION_KEY = "canary-fraction"
DEFAULT_ROLLOUT_DIR = Path("/etc/atlas/rollout")
DEFAULT_VERSION_FILE = DEFAULT_ROLLOUT_DIR / WEIGHT_VERSION_KEY
MAX_VERSION_CHARS = 128
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")


def check_version(version: str) -> str:
    version = version.strip()
    if not version or len(version) > MAX_VERSION_CHARS or not _VERSION_RE.match(version):
        raise RequestError(
            "version",
            f"must be 1..{MAX_VERSION_CHARS} characters of letters, digits and ._:+- "
            "starting with a letter or digit",
        )
    return version


class WeightVersions:
    def __init__(self, version_file: Path | None = None) -> None:
        self._lock = threading.Lock()
        self.version_file = version_file
        self._file_seen = self._read_file()
        self.serving = self._file_seen or BASE_VERSION
        self.requested = ""

    def request(self, version: str) -> str:
        """Record a rollout request; return the checked version."""
        version = check_version(version)
        with self._lock:
            self.requested = version
        return version

    def poll_file(self) -> bool:
        """Pick up a changed rollout file as a request; True when it changed."""
        content = self._read_file()
        with self._lock:
            if not content or content == self._file_seen:
                return False
            self._file_seen = content
            self.requested = content
            return True

    def _read_file(self) -> str:
        if self.version_file is None:
            return ""
        try:
            return check_version(self.version_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RequestError):
            return ""  # absent or malformed: keep what we have
