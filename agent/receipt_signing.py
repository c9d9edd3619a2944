"""The agent's own Ed25519 key, which signs temporary receipts so they cannot be forged.

A temporary receipt is not a KRA tax invoice, but it is still money changing hands: a customer or
an auditor must be able to tell one the agent issued from one typed up elsewhere. Each temporary
receipt carries the hash of its sale's entry in the agent's hash-chained journal (and the entry
before it), and an Ed25519 signature over the receipt's essentials and that hash. Anyone with the
agent's public key (shown by `etims-agent status` and in `/v1/status`) can check a receipt; with
the journal (`etims-agent verify`) the chain shows no receipt was removed or rewritten.

The signed message is text, one field per line (UTF-8, no newline at the end), so it can be rebuilt
by hand: "etims-agent temporary receipt v1", then key id, till_id, sale_id, receipt_no, issued_at,
total and the journal hash. Ed25519 is deterministic: a reprint or
a replayed answer carries the same signature.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from agent.secret import Secret

KEY_NAME = "agent.receipt_key"  # in the secret store
_HEADER = "etims-agent temporary receipt v1"


@dataclass(frozen=True, slots=True)
class ReceiptFacts:
    """What a temporary receipt's signature covers."""

    till_id: str
    sale_id: str
    receipt_no: int
    issued_at: str
    total: str
    journal_hash: str


def message(key_id: str, facts: ReceiptFacts) -> bytes:
    fields = (_HEADER, key_id, facts.till_id, facts.sale_id, str(facts.receipt_no), facts.issued_at,
              facts.total, facts.journal_hash)
    return "\n".join(fields).encode()


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class ReceiptSigner:
    """Signs temporary receipts with the agent's private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_of(self.public_raw)

    @classmethod
    def generate(cls) -> ReceiptSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_secret(cls, secret: Secret) -> ReceiptSigner:
        raw = base64.b64decode(secret.reveal(), validate=True)
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def to_secret(self) -> Secret:
        raw = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return Secret(base64.b64encode(raw).decode())

    @property
    def public_key(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    def sign(self, facts: ReceiptFacts) -> str:
        return base64.b64encode(self._private.sign(message(self.key_id, facts))).decode()


def verify(public_key: str, key_id: str, facts: ReceiptFacts, signature: str) -> bool:
    """Whether `signature` is the agent's (public key in base64) over these receipt facts."""
    try:
        raw = base64.b64decode(public_key, validate=True)
        if key_id_of(raw) != key_id:
            return False
        Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(signature, validate=True),
                                                       message(key_id, facts))
    except (InvalidSignature, ValueError):
        return False
    return True
