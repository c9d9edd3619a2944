"""TSMS payload checksums: tsms-api.md §2.5 example (a) byte for byte, derived vectors, the server's
verification and error messages, Laravel's view of the body, and properties over random payloads.

Provenance of the constants: example (a)'s strings and digests are the doc's. Every other canonical
string was written by hand from §2.2-2.3, and every other digest was computed outside this module,
by PHP 8.2's own json_encode / number_format / is_numeric / (float) running the §2.2
canonicalisation (that same PHP run reproduces example (a)'s published digests).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sync.checksum import (
    VERSIONS,
    canonical,
    checksum,
    encode,
    server_view,
    sign_envelope,
    sign_submission,
    sign_transaction,
    verify_submission,
    verify_void,
    void_checksum,
)

TX_A_DIGEST = "a32f34367c2967266e106e87040d213f28dde202595ee4e5124f0e651142da7b"
ENVELOPE_A_DIGEST = "20ab5b1917d5acc95eb701b9266403df9815d03ec38fe1807ecf4ffe66ceea4d"
ADJUSTMENT_TYPES = (
    "promo_discount", "senior_discount", "pwd_discount", "vip_card_discount",
    "service_charge_distributed_to_employees", "service_charge_retained_by_management", "employee_discount",
)

# §2.5 (a): the transaction's canonical string, verbatim from the doc.
TX_A_CANONICAL = (
    '{"adjustments":[{"adjustment_type":"promo_discount","amount":"0.00"},{"adjustment_type":"senior_discount",'
    '"amount":"0.00"},{"adjustment_type":"pwd_discount","amount":"0.00"},{"adjustment_type":"vip_card_discount",'
    '"amount":"0.00"},{"adjustment_type":"service_charge_distributed_to_employees","amount":"0.00"},'
    '{"adjustment_type":"service_charge_retained_by_management","amount":"0.00"},'
    '{"adjustment_type":"employee_discount","amount":"0.00"}],"customer_code":"C-T1001","gross_sales":"1120.00",'
    '"hardware_id":"SN-0007","net_sales":"1000.00","promo_status":"NONE","receipt_no":"R-000123",'
    '"taxes":[{"amount":"120.00","tax_type":"VAT"},{"amount":"1000.00","tax_type":"VATABLE_SALES"},'
    '{"amount":"0.00","tax_type":"SC_VAT_EXEMPT_SALES"},{"amount":"0.00","tax_type":"OTHER_TAX"}],'
    '"transaction_id":"6f1d2c3b-4a5e-4f70-8a9b-0c1d2e3f4a5b","transaction_timestamp":"2025-08-20T10:15:30Z"}'
)
# The submission's: the same transaction plus its checksum (sorted between net_sales and promo_status).
ENVELOPE_A_CANONICAL = (
    '{"submission_timestamp":"2025-08-20T10:15:35Z","submission_uuid":"0b9c3f4e-8a1d-4c2b-9f3e-5d6a7b8c9d0e",'
    '"tenant_id":1,"terminal_id":7,"transaction":'
    + TX_A_CANONICAL.replace('"promo_status"', f'"payload_checksum":"{TX_A_DIGEST}","promo_status"')
    + ',"transaction_count":1}'
)

# §1.4's JSON block, verbatim.
EXAMPLE_A_JSON = """{
  "submission_uuid": "0b9c3f4e-8a1d-4c2b-9f3e-5d6a7b8c9d0e",
  "tenant_id": 1,
  "terminal_id": 7,
  "submission_timestamp": "2025-08-20T10:15:35Z",
  "transaction_count": 1,
  "transaction": {
    "transaction_id": "6f1d2c3b-4a5e-4f70-8a9b-0c1d2e3f4a5b",
    "hardware_id": "SN-0007",
    "receipt_no": "R-000123",
    "transaction_timestamp": "2025-08-20T10:15:30Z",
    "gross_sales": 1120.00,
    "net_sales": 1000.00,
    "promo_status": "NONE",
    "customer_code": "C-T1001",
    "adjustments": [
      {"adjustment_type": "promo_discount", "amount": 0},
      {"adjustment_type": "senior_discount", "amount": 0},
      {"adjustment_type": "pwd_discount", "amount": 0},
      {"adjustment_type": "vip_card_discount", "amount": 0},
      {"adjustment_type": "service_charge_distributed_to_employees", "amount": 0},
      {"adjustment_type": "service_charge_retained_by_management", "amount": 0},
      {"adjustment_type": "employee_discount", "amount": 0}
    ],
    "taxes": [
      {"tax_type": "VAT", "amount": 120.00},
      {"tax_type": "VATABLE_SALES", "amount": 1000.00},
      {"tax_type": "SC_VAT_EXEMPT_SALES", "amount": 0},
      {"tax_type": "OTHER_TAX", "amount": 0}
    ],
    "payload_checksum": "a32f34367c2967266e106e87040d213f28dde202595ee4e5124f0e651142da7b"
  },
  "payload_checksum": "20ab5b1917d5acc95eb701b9266403df9815d03ec38fe1807ecf4ffe66ceea4d"
}"""

MONEY_FORMS = {"float": float, "decimal": Decimal, "string": str}


def example_tx(money: Any = float) -> dict[str, Any]:
    """§1.4's transaction without its checksum, every money value built by `money` from text."""
    return {
        "transaction_id": "6f1d2c3b-4a5e-4f70-8a9b-0c1d2e3f4a5b",
        "hardware_id": "SN-0007",
        "receipt_no": "R-000123",
        "transaction_timestamp": "2025-08-20T10:15:30Z",
        "gross_sales": money("1120.00"),
        "net_sales": money("1000.00"),
        "promo_status": "NONE",
        "customer_code": "C-T1001",
        "adjustments": [{"adjustment_type": kind, "amount": money("0")} for kind in ADJUSTMENT_TYPES],
        "taxes": [
            {"tax_type": "VAT", "amount": money("120.00")},
            {"tax_type": "VATABLE_SALES", "amount": money("1000.00")},
            {"tax_type": "SC_VAT_EXEMPT_SALES", "amount": money("0")},
            {"tax_type": "OTHER_TAX", "amount": money("0.00")},
        ],
    }


def example_envelope(money: Any = float) -> dict[str, Any]:
    return {
        "submission_uuid": "0b9c3f4e-8a1d-4c2b-9f3e-5d6a7b8c9d0e",
        "tenant_id": 1,
        "terminal_id": 7,
        "submission_timestamp": "2025-08-20T10:15:35Z",
        "transaction_count": 1,
        "transaction": example_tx(money),
    }


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same data with every dict's keys in a random order."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {key: shuffled(value[key], rng) for key in keys}
    if isinstance(value, list):
        return [shuffled(item, rng) for item in value]
    return value


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- §2.5 example (a) ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", MONEY_FORMS)
def test_example_a_transaction_canonical_string_and_digest(form: str) -> None:
    tx = example_tx(MONEY_FORMS[form])
    assert encode(canonical(tx, "v2.1")) == TX_A_CANONICAL
    assert checksum(tx) == TX_A_DIGEST
    assert checksum(dict(tx, payload_checksum="anything")) == TX_A_DIGEST  # its own checksum is excluded


@pytest.mark.parametrize("form", MONEY_FORMS)
def test_example_a_signed_envelope(form: str) -> None:
    envelope = example_envelope(MONEY_FORMS[form])
    before = copy.deepcopy(envelope)
    signed = sign_submission(envelope)
    assert envelope == before  # the input is untouched
    assert signed["transaction"]["payload_checksum"] == TX_A_DIGEST
    assert signed["payload_checksum"] == ENVELOPE_A_DIGEST
    unsigned = {key: value for key, value in signed.items() if key != "payload_checksum"}
    assert encode(canonical(unsigned, "v2.1")) == ENVELOPE_A_CANONICAL
    assert checksum(signed) == ENVELOPE_A_DIGEST
    assert verify_submission(signed) == ("v2.1", [])


@pytest.mark.parametrize("seed", range(5))
def test_example_a_with_keys_shuffled(seed: int) -> None:
    envelope = shuffled(example_envelope(), random.Random(seed))
    assert json.dumps(envelope) != json.dumps(example_envelope())  # the order really differs
    signed = sign_submission(envelope)
    assert (signed["transaction"]["payload_checksum"], signed["payload_checksum"]) == (TX_A_DIGEST, ENVELOPE_A_DIGEST)


def test_the_documented_json_block_verifies_as_v21() -> None:
    body = json.loads(EXAMPLE_A_JSON)
    assert verify_submission(server_view(body)) == ("v2.1", [])
    decimal_body = json.loads(EXAMPLE_A_JSON, parse_float=Decimal)  # a Decimal-keeping parser agrees
    assert verify_submission(server_view(decimal_body)) == ("v2.1", [])


# --- derived vectors ----------------------------------------------------------------------------

TX1 = {"transaction_id": "11111111-1111-4111-8111-111111111111", "receipt_no": "R-1", "gross_sales": 100,
       "net_sales": 86.21, "taxes": [{"tax_type": "VAT", "amount": 13.79}]}
TX2 = {"transaction_id": "22222222-2222-4222-8222-222222222222", "receipt_no": "R-2", "gross_sales": "58.5",
       "net_sales": Decimal("50.43"), "taxes": [{"tax_type": "VAT", "amount": Decimal("8.07")}]}
TX1_DIGEST = "587e89def4a5cb3e8cca95eeb3edcad696441ee4bc65f3621c7de2c875ed32dd"
TX2_DIGEST = "90dbf485fcfdf780891544c740cdc72842fa3ba0b6eca72cc0856ff7bf72b728"
BATCH_DIGEST = "14c007deb34e84e28df6f777fca02160cc31eebc331ac1d70a505ae60d56f94e"
TX1_CANONICAL = ('{"gross_sales":"100.00","net_sales":"86.21","receipt_no":"R-1","taxes":[{"amount":"13.79",'
                 '"tax_type":"VAT"}],"transaction_id":"11111111-1111-4111-8111-111111111111"}')
TX2_CANONICAL = ('{"gross_sales":"58.50","net_sales":"50.43","receipt_no":"R-2","taxes":[{"amount":"8.07",'
                 '"tax_type":"VAT"}],"transaction_id":"22222222-2222-4222-8222-222222222222"}')


def batch_envelope() -> dict[str, Any]:
    return {"submission_uuid": "33333333-3333-4333-8333-333333333333", "tenant_id": 1, "terminal_id": 7,
            "submission_timestamp": "2026-01-02T03:04:05Z", "transaction_count": 2,
            "transactions": [copy.deepcopy(TX1), copy.deepcopy(TX2)]}


def test_batch_of_two_nests_the_item_checksums_in_the_envelope_hash() -> None:
    assert encode(canonical(TX1, "v2.1")) == TX1_CANONICAL
    assert encode(canonical(TX2, "v2.1")) == TX2_CANONICAL
    signed = sign_submission(batch_envelope())
    assert [tx["payload_checksum"] for tx in signed["transactions"]] == [TX1_DIGEST, TX2_DIGEST]
    # "transaction_count" sorts before "transactions" ('_' < 's'); nested checksums are included.
    assert encode(canonical({k: v for k, v in signed.items() if k != "payload_checksum"}, "v2.1")) == (
        '{"submission_timestamp":"2026-01-02T03:04:05Z","submission_uuid":"33333333-3333-4333-8333-333333333333",'
        '"tenant_id":1,"terminal_id":7,"transaction_count":2,"transactions":['
        + TX1_CANONICAL.replace('"receipt_no"', f'"payload_checksum":"{TX1_DIGEST}","receipt_no"') + ","
        + TX2_CANONICAL.replace('"receipt_no"', f'"payload_checksum":"{TX2_DIGEST}","receipt_no"') + "]}"
    )
    assert signed["payload_checksum"] == BATCH_DIGEST
    assert verify_submission(signed) == ("v2.1", [])


def test_strings_unicode_slashes_line_separators_controls_quotes() -> None:
    value = {"customer_code": "Wanjiku Ḿ", "url": "https://tsms.example/api/v1", "quote": 'say "hi" \\ back',
             "seps": "a\u2028b\u2029c", "ctrl": "\x00\x01\x08\x09\x0a\x0c\x0d\x1f\x7f", "emoji": "😀"}
    expected = ('{"ctrl":"\\u0000\\u0001\\b\\t\\n\\f\\r\\u001f\x7f","customer_code":"Wanjiku Ḿ","emoji":"😀",'
                '"quote":"say \\"hi\\" \\\\ back","seps":"a\\u2028b\\u2029c","url":"https://tsms.example/api/v1"}')
    assert encode(canonical(value, "v2.1")) == expected
    assert "Wanjiku Ḿ".encode() in expected.encode("utf-8")  # raw UTF-8, not \u escapes
    assert checksum(value) == "c97a7ac2f778fbad0c748dab8434e889a92ecbaf97031953ddd485ac94564c8d"


def test_empty_objects_become_empty_lists() -> None:
    value = {"meta": {}, "list": [], "nested": {"z": {}, "a": [{}]}}
    assert encode(canonical(value, "v2.1")) == '{"list":[],"meta":[],"nested":{"a":[[]],"z":[]}}'
    assert checksum(value) == "07ed371bcf55a573520d105a9edf57bcc569bc4067f28cde40b2cf4c06de8f03"
    assert canonical({}, "v2.1") == []
    assert checksum({"payload_checksum": "x"}) == "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
    assert checksum({"payload_checksum": "x"}) == sha256("[]")


V20_VALUE = {"gross_sales": 1120.0, "net_sales": 56.5, "tenant_id": 0, "ratio": 0.0, "rate": 16.0,
             "taxes": [{"tax_type": "VAT", "amount": "120.00"}, {"tax_type": "OTHER_TAX", "amount": 0}]}


def test_v20_casts_money_to_float_and_whole_floats_lose_their_zero_fraction() -> None:
    assert encode(canonical(V20_VALUE, "v2.0")) == (
        '{"gross_sales":1120,"net_sales":56.5,"rate":16,"ratio":0,'
        '"taxes":[{"amount":120,"tax_type":"VAT"},{"amount":0,"tax_type":"OTHER_TAX"}],"tenant_id":0}'
    )
    assert checksum(V20_VALUE, "v2.0") == "1e4f94c79b6734ab18ec395c7cf2f10386e02714ead72fc3f426c237e2d3a2c2"
    # The same data under v2.1: money becomes 2-decimal strings, other floats stay PHP floats.
    assert encode(canonical(V20_VALUE, "v2.1")) == (
        '{"gross_sales":"1120.00","net_sales":"56.50","rate":16,"ratio":0,'
        '"taxes":[{"amount":"120.00","tax_type":"VAT"},{"amount":"0.00","tax_type":"OTHER_TAX"}],"tenant_id":0}'
    )
    assert checksum(V20_VALUE, "v2.1") == "c9a05af927030777a70a0fe1114f9d15d12ae6c8831b22a1e4444dc6f7a8febe"
    assert encode(canonical({"amount": Decimal("1120.00")}, "v2.0")) == '{"amount":1120}'


def test_legacy_casts_base_amount_and_amount_but_not_gross_sales() -> None:
    value = {"base_amount": "1000.50", "amount": 5, "gross_sales": "1120.00", "net_sales": 1000.0,
             "adjustments": [{"adjustment_type": "promo_discount", "amount": "0"}]}
    assert encode(canonical(value, "legacy")) == (
        '{"adjustments":[{"adjustment_type":"promo_discount","amount":0}],"amount":5,"base_amount":1000.5,'
        '"gross_sales":"1120.00","net_sales":1000}'
    )
    assert checksum(value, "legacy") == "0c069ca329765408f708b23d186ef90351980bf0d88483f4dba25e1113200c9f"


def test_v21_rounds_numeric_money_half_away_from_zero_and_leaves_the_rest() -> None:
    amounts = ["0.125", 56.5, -0.001, "n/a", None, True, -0.005, 2.675, " 7 ", Decimal("0.125"), "1e3",
               1.004999999999999,  # PHP pre-rounds to 15 digits first: 1.00500000000000 -> 1.01
               Decimal("99999999999999.99")]  # the server's double of this prints .98 (see the module)
    value = {"gross_sales": 1120, "net_sales": "", "adjustments": [{"amount": a} for a in amounts]}
    assert encode(canonical(value, "v2.1")) == (
        '{"adjustments":[{"amount":"0.13"},{"amount":"56.50"},{"amount":"0.00"},{"amount":"n/a"},'
        '{"amount":null},{"amount":true},{"amount":"-0.01"},{"amount":"2.68"},{"amount":"7.00"},'
        '{"amount":"0.13"},{"amount":"1000.00"},{"amount":"1.01"},{"amount":"99999999999999.98"}],'
        '"gross_sales":"1120.00","net_sales":""}'
    )
    assert checksum(value) == "381e805ded1eb1bd5230c644517b6abb280a39c4976174573ffa47008da00b7e"


def test_void_checksum_covers_only_id_and_reason() -> None:
    tx_id, reason = "6f1d2c3b-4a5e-4f70-8a9b-0c1d2e3f4a5b", "Customer changed their mind"
    assert encode(canonical({"void_reason": reason, "transaction_id": tx_id}, "v2.1")) == (
        '{"transaction_id":"6f1d2c3b-4a5e-4f70-8a9b-0c1d2e3f4a5b","void_reason":"Customer changed their mind"}'
    )
    digest = "65e50a2cf8d610d6bcfdb5e9496bb8710bc9439a789e2f819124c49316a0769c"
    assert void_checksum(tx_id, reason) == digest
    assert verify_void(tx_id, reason, digest)
    assert not verify_void(tx_id, reason, digest.upper())  # the void endpoint compares with !==
    assert not verify_void(tx_id, reason + ".", digest)


def test_php_float_text_including_exponent_form() -> None:
    value = {"big": 1e25, "dec": Decimal("1E+25"), "edge": 1e16, "ten17": 1e17, "small": 1e-5,
             "tiny_ok": 0.0001, "neg_zero": -0.0, "huge_int": 2**64}
    assert encode(canonical(value, "v2.1")) == (
        '{"big":1.0e+25,"dec":1.0e+25,"edge":10000000000000000,"huge_int":1.8446744073709552e+19,'
        '"neg_zero":-0,"small":1.0e-5,"ten17":1.0e+17,"tiny_ok":0.0001}'
    )
    assert checksum(value) == "1691aa86a240608c4db64a9726b46e01906357efc868b736a9cc497aee36d1cb"
    assert [encode(x) for x in (1120.0, 56.5, 0, 0.0, 0.1 + 0.2, 1.5e-5)] == [
        "1120", "56.5", "0", "0", "0.30000000000000004", "1.5e-5"]


def test_encode_refuses_what_php_cannot_encode() -> None:
    for bad in (float("nan"), float("inf"), Decimal("NaN"), "lone \ud800 surrogate"):
        with pytest.raises(ValueError):
            encode(bad)
    with pytest.raises(TypeError):
        encode({1: "non-string key"})
    with pytest.raises(TypeError):
        encode({"a": object()})


def test_unknown_version_is_refused() -> None:
    message = "checksum version: 'v3' is not one of v2.1, v2.0, legacy"
    for call in (lambda: canonical({}, "v3"), lambda: checksum({}, "v3"), lambda: sign_submission({}, "v3")):
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value) == message
    assert VERSIONS == ("v2.1", "v2.0", "legacy")


# --- the server's verification ------------------------------------------------------------------


def test_a_v20_signed_body_passes_through_the_fallback() -> None:
    signed = sign_submission(example_envelope(), "v2.0")
    assert (signed["transaction"]["payload_checksum"], signed["payload_checksum"]) == (
        "61bce4df7ad53c2e84a88ba50a9c9f3e96449b4b91953aa23cb2bc3b8a8c1f6b",
        "ac26760ea6e2473e0055bd8489736e9bdf8139e64342ce8e5c459e42feaafd13",
    )
    assert verify_submission(signed) == ("v2.0", [])


def test_a_tampered_amount_fails_with_the_v21_messages_revealing_the_computed_hash() -> None:
    body = json.loads(EXAMPLE_A_JSON)
    body["transaction"]["gross_sales"] = 1121.00
    assert verify_submission(server_view(body)) == (None, [
        f"Invalid payload_checksum for transaction (v2.1). Received: {TX_A_DIGEST}, "
        "Computed: bce383e88c69d1824776f16f5dd2bc9e0dabbeb4d51fb2a4ac38a3c97294fc46",
        f"Invalid payload_checksum for submission (v2.1). Received: {ENVELOPE_A_DIGEST}, "
        "Computed: f64eed9254232eaaedc7d1b8e58e09d1439495f8b250a4064c69667ece26fac3",
    ])


def test_a_tampered_batch_item_reports_its_index_and_no_submission_error() -> None:
    signed = sign_submission(batch_envelope())
    signed["transactions"][1]["net_sales"] = Decimal("50.44")
    assert verify_submission(signed) == (None, [
        f"Invalid payload_checksum for transaction at index 1 (v2.1). Received: {TX2_DIGEST}, "
        "Computed: 233801e0157ddaeb6a632811f403cce34903e3012795fc22eb53346284deb2f0",
    ])


def test_upper_case_hex_is_accepted() -> None:
    signed = sign_submission(example_envelope())
    signed["transaction"]["payload_checksum"] = signed["transaction"]["payload_checksum"].upper()
    # The envelope hash covers the nested checksum as sent, so re-sign the envelope over the upper-case one.
    signed["payload_checksum"] = checksum(signed).upper()
    assert verify_submission(signed) == ("v2.1", [])


def test_a_missing_checksum_is_reported_as_missing() -> None:
    body = json.loads(EXAMPLE_A_JSON)
    del body["transaction"]["payload_checksum"]
    assert verify_submission(body) == (None, [
        f"Invalid payload_checksum for transaction (v2.1). Received: missing, Computed: {TX_A_DIGEST}",
        f"Invalid payload_checksum for submission (v2.1). Received: {ENVELOPE_A_DIGEST}, "
        "Computed: 2a6840e40c930838ad9be1a58b1565f73747afd806e71f790f09f2137facc867",
    ])


def test_a_body_without_transactions_is_unsupported() -> None:
    expected = (None, ["Unsupported payload structure: expected transaction or transactions"])
    assert verify_submission({"payload_checksum": "0" * 64}) == expected
    assert verify_submission({"transaction": None, "transactions": "nope"}) == expected


# --- Laravel's view of the body -----------------------------------------------------------------


def test_server_view_trims_strings_and_turns_empty_ones_into_null() -> None:
    body = {" key ": "  NONE\t", "blank": "", "spaces": " \n ", "n": 0, "f": 1.5, "b": False, "none": None,
            "nested": [{"a": " x y ", "b": ["", " z"]}], "unicode": "\ufeff\u00a0Wanjiku Ḿ\u200b\u3000",
            "money": Decimal("1.50")}
    before = copy.deepcopy(body)
    assert server_view(body) == {" key ": "NONE", "blank": None, "spaces": None, "n": 0, "f": 1.5, "b": False,
                                 "none": None, "nested": [{"a": "x y", "b": [None, "z"]}], "unicode": "Wanjiku Ḿ",
                                 "money": Decimal("1.50")}
    assert body == before


def test_a_client_hashing_untrimmed_strings_fails_on_the_server() -> None:
    envelope = example_envelope()
    envelope["transaction"]["promo_status"] = " NONE"
    client_signed = sign_submission(envelope)
    assert verify_submission(client_signed) == ("v2.1", [])  # self-consistent as sent...
    version, errors = verify_submission(server_view(client_signed))  # ...but the server hashes "NONE"
    assert version is None
    assert [e.split(" Received")[0] for e in errors] == [
        "Invalid payload_checksum for transaction (v2.1).", "Invalid payload_checksum for submission (v2.1)."]
    assert f"Computed: {TX_A_DIGEST}" in errors[0]  # exactly the digest of the trimmed transaction
    # Signing what the server will see works.
    assert verify_submission(server_view(sign_submission(server_view(envelope)))) == ("v2.1", [])


# --- properties ---------------------------------------------------------------------------------

KEYS = st.sampled_from(["amount", "gross_sales", "net_sales", "base_amount", "tax_type", "a", "Z", "é", "ключ"])
SCALARS = (
    st.text(max_size=12)
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.decimals(min_value=-(10**12), max_value=10**12, places=3, allow_nan=False, allow_infinity=False)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
)
ANY_KEY = KEYS | st.text(min_size=1, max_size=6)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_KEY, inner, max_size=4),
    max_leaves=20,
)
OBJECTS = st.dictionaries(ANY_KEY, JSON_VALUES, max_size=6)


@given(OBJECTS, st.randoms(use_true_random=False))
def test_checksum_does_not_depend_on_key_order(value: dict[str, Any], rng: random.Random) -> None:
    for version in VERSIONS:
        assert checksum(shuffled(value, rng), version) == checksum(value, version)


@given(st.lists(OBJECTS, min_size=1, max_size=3), OBJECTS)
def test_signed_submissions_verify(transactions: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    envelope: dict[str, Any] = {**extra, "transaction_count": len(transactions)}
    envelope.pop("transaction", None)
    if len(transactions) == 1:
        envelope["transaction"] = transactions[0]
    else:
        envelope["transactions"] = transactions
    assert verify_submission(sign_submission(envelope)) == ("v2.1", [])
    # What a careful client does: sign the server's view, which the server then leaves unchanged.
    assert verify_submission(server_view(sign_submission(server_view(envelope)))) == ("v2.1", [])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key", ["transaction", "transactions"])
def test_signing_one_transaction_at_a_time_gives_the_same_submission(key: str, version: str) -> None:
    """The TSMS lane signs each transaction on its own, then the envelope over their texts: the
    same checksums as signing the whole submission at once."""
    envelope = example_envelope(Decimal) if key == "transaction" else batch_envelope()
    fields = {k: v for k, v in envelope.items() if k != key}
    items = [envelope[key]] if key == "transaction" else envelope[key]
    signed = sign_envelope(fields, key, [sign_transaction(item, version) for item in items], version)
    assert signed == sign_submission(envelope, version)
    if version != "legacy":  # the server checks v2.1, then v2.0
        assert verify_submission(signed) == (version, [])
    with pytest.raises(ValueError, match="one transaction goes under"):
        sign_envelope(fields, "transaction", [sign_transaction(item, version) for item in items * 2], version)
