"""The README's quick-start sale is the example sale the tests, the smoke test and the benchmarks post
(installer/examples/sale.json): a reader who copies it posts what is proven to work."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import EXAMPLE_SALE

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_posts_the_example_sale() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"curl -s -X POST http://127\.0\.0\.1:8089/v1/sales .*? -d '(\{.*?\})'\n", readme, re.S)
    assert match is not None, "the quick start's curl command is not in the README"
    assert json.loads(match.group(1)) == EXAMPLE_SALE

