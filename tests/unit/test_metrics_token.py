"""The bearer token of /metrics (HERALD_METRICS_TOKEN)."""

import pytest

from pipeline.metrics import token_allowed


def test_no_token_configured_lets_every_scrape_in():
    assert token_allowed(None, None) and token_allowed("Bearer anything", None)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic c2VjcmV0",
                                    "secret", "Bearer secret2", "Bearer secre", "Token secret"])
def test_anything_but_the_bearer_token_is_refused(header):
    assert not token_allowed(header, "secret")


@pytest.mark.parametrize("header", ["Bearer secret", "bearer secret", "Bearer  secret "])
def test_the_bearer_token_is_accepted(header):
    assert token_allowed(header, "secret")
