"""The site's de-identification secret: one salt turns originals into stable pseudonyms.

Every derived value is an HMAC-SHA256 (pyca ``cryptography``) of the original under the
salt, so the same input gives the same output across batches while the salt is kept, and
nobody without the salt can recompute or reverse the mapping. The salt never enters logs.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac

from privmed.errors import ConfigError, DataError

SALT_BYTES = 32
_MIN_SALT_BYTES = 16
# Shift dates back by 1 .. 3650 days: far enough to break linkage on dates, while
# intervals between one patient's studies are kept exactly.
MAX_DATE_SHIFT_DAYS = 3650


class Salt:
    """Keyed, deterministic pseudonyms for UIDs, patient ids and date offsets."""

    def __init__(self, key: bytes) -> None:
        if len(key) < _MIN_SALT_BYTES:
            raise ConfigError(f"A de-identification salt needs at least {_MIN_SALT_BYTES} "
                              f"bytes, got {len(key)}.")
        self._key = key

    def __repr__(self) -> str:  # never print the key
        return "Salt(<secret>)"

    def digest(self, purpose: str, value: str) -> bytes:
        """HMAC-SHA256 of ``value`` under the salt, separated by ``purpose``."""
        mac = hmac.HMAC(self._key, hashes.SHA256())
        mac.update(purpose.encode() + b"\x00" + value.encode("utf-8", "surrogateescape"))
        return mac.finalize()

    def uid(self, original: str) -> str:
        """A DICOM UID under the UUID root 2.25 (PS3.5 B.2): a name-based UUID
        (version 8, RFC 9562) made of the HMAC, at most 44 characters."""
        raw = bytearray(self.digest("uid", original)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom, here keyed-hash based
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122/9562 variant
        return "2.25." + str(int.from_bytes(raw, "big"))

    def patient_pseudonym(self, patient_id: str) -> str:
        """``PM`` + 16 hex digits: stable per original Patient ID, fits a LO/SH value."""
        return "PM" + self.digest("patient", patient_id)[:8].hex().upper()

    def date_shift_days(self, patient_id: str) -> int:
        """Days (1 .. 3650) to move this patient's dates back; the same for all their files."""
        value = int.from_bytes(self.digest("date-shift", patient_id)[:8], "big")
        return 1 + value % MAX_DATE_SHIFT_DAYS


def load_or_create_salt(path: str | Path) -> tuple[Salt, bool]:
    """Read the salt file (hex), or create one with a fresh 256-bit secret (mode 0600).

    Returns the salt and whether the file was created now.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"Salt file {path} is a folder; give a file path.")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = os.urandom(SALT_BYTES)  # the OS CSPRNG, which pyca uses too
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
        return Salt(key), True
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"Salt file {path} cannot be read as a hex secret (was it written "
                        "by privmed?).") from exc
    return Salt(key), False
