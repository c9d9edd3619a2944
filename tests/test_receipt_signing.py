"""Temporary receipts carry their journal entry and the agent's Ed25519 signature over them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import make_sale
from starlette.testclient import TestClient

from agent.app import receipt_signer
from agent.config import load_config
from agent.queue.outbox import Outbox
from agent.receipt_signing import ReceiptFacts, ReceiptSigner, verify

FACTS = ReceiptFacts(till_id="TILL-1", sale_id="R-1", receipt_no=7, issued_at="2026-11-21T14:05:00+03:00",
                     total="171.00", journal_hash="ab" * 32)


class TestSignature:
    def test_signature_verifies_and_is_deterministic(self) -> None:
        signer = ReceiptSigner.generate()
        signature = signer.sign(FACTS)
        assert signature == signer.sign(FACTS)  # a reprint carries the same signature
        assert verify(signer.public_key, signer.key_id, FACTS, signature)

    @pytest.mark.parametrize("change", [{"total": "1.00"}, {"receipt_no": 8}, {"sale_id": "R-2"},
                                        {"journal_hash": "cd" * 32}, {"issued_at": "2026-11-22T14:05:00+03:00"}])
    def test_an_altered_receipt_fails(self, change: dict[str, Any]) -> None:
        signer = ReceiptSigner.generate()
        signature = signer.sign(FACTS)
        altered = dataclasses.replace(FACTS, **change)
        assert not verify(signer.public_key, signer.key_id, altered, signature)

    def test_another_key_fails(self) -> None:
        signer, other = ReceiptSigner.generate(), ReceiptSigner.generate()
        signature = other.sign(FACTS)
        assert not verify(signer.public_key, signer.key_id, FACTS, signature)
        assert not verify(other.public_key, signer.key_id, FACTS, signature)  # key id must match the key
        assert not verify(signer.public_key, signer.key_id, FACTS, "not base64!")

    def test_key_round_trips_through_the_secret_form(self) -> None:
        signer = ReceiptSigner.generate()
        again = ReceiptSigner.from_secret(signer.to_secret())
        assert (again.key_id, again.sign(FACTS)) == (signer.key_id, signer.sign(FACTS))
        assert signer.public_key not in repr(signer.to_secret())


def test_the_key_is_made_once_and_kept(tmp_path: Path) -> None:
    """The agent's key is created on first start in the secret store and the same key is loaded later."""
    config = tmp_path / "agent.toml"
    config.write_text('data_dir = "data"\n[secrets]\nbackend = "file"\n')
    cfg = load_config(config)
    first, second = receipt_signer(cfg), receipt_signer(cfg)
    assert first.key_id == second.key_id
    assert (tmp_path / "data" / "secrets.enc").exists()


def test_temporary_receipt_chain_matches_the_journal(client: TestClient, outbox: Outbox) -> None:
    """The chain shows the sale's journal entry; its signature verifies with the key in /v1/status."""
    first = client.post("/v1/sales", json=make_sale(sale_id="R-1")).json()
    body = client.post("/v1/sales", json=make_sale(sale_id="R-2")).json()
    chain = body["receipt"]["chain"]
    entries = outbox.journal()
    assert (chain["prev_hash"], chain["hash"]) == (entries[1].prev_hash, entries[1].hash)
    assert chain["prev_hash"] == first["receipt"]["chain"]["hash"]
    key = client.get("/v1/status").json()["agent"]["receipt_key"]
    assert key["key_id"] == chain["key_id"]
    facts = ReceiptFacts(till_id="TILL-1", sale_id="R-2", receipt_no=body["receipt_no"],
                         issued_at=body["receipt"]["issued_at"], total=body["receipt"]["totals"]["total"],
                         journal_hash=chain["hash"])
    assert verify(key["public_key"], key["key_id"], facts, chain["signature"])
    assert client.get("/v1/sales/R-2").json() == body  # the same proof on every read
