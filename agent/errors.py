"""One error tree for the agent.

Every message is a sentence that names the problem and ends with what to do about it. Adapters
translate their libraries' exceptions (sqlite3, httpx, pyserial) into these at their edge.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is missing, of the wrong type or out of range."""

    def __init__(self, key: str, problem: str, hint: str, *, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.hint = hint
        self.source = source
        where = f" (in {source})" if source else ""
        super().__init__(f"{key}: {problem}; {hint}{where}")


class InvalidSale(AgentError):
    """The till sent a sale that KRA would refuse; it is never queued.

    `field` is the path of the offending value in the till's JSON, e.g. `lines[2].qty`.
    """

    def __init__(self, field: str, code: str, message: str) -> None:
        self.field = field
        self.code = code
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class SaleConflict(AgentError):
    """The same sale id arrived again with different content."""

    def __init__(self, till_id: str, sale_id: str) -> None:
        self.till_id = till_id
        self.sale_id = sale_id
        super().__init__(
            f"sale {sale_id!r} of till {till_id!r} was already accepted with different content; "
            "give a corrected sale a new sale_id, or issue a credit note for the original"
        )


class StorageError(AgentError):
    """The outbox cannot be used (disk full, corrupt, unreadable)."""


class SalePruned(StorageError):
    """The outbox refused the sale: its id belongs to a sale signed, synced and pruned here."""

    def __init__(self, till_id: str, sale_id: str, refusal: str) -> None:
        self.till_id = till_id
        self.sale_id = sale_id
        super().__init__(f"sale {sale_id!r} of till {till_id!r}: {refusal}")


class OutboxDamaged(StorageError):
    """The outbox file fails SQLite's own checks: not a database, or damaged pages."""


class DiskFull(StorageError):
    """The disk holding the outbox is full; nothing was stored, and nothing stored was harmed."""


class DataDirLocked(AgentError):
    """Another agent process already owns the data directory."""


class KraError(AgentError):
    """KRA refused a device operation or could not be reached; the message says what to do."""
