"""The bearer token of /metrics (HERALD_METRICS_TOKEN), and who may scrape without one."""

import pytest

from pipeline.core.metrics import scrape_allowed, token_allowed
from pipeline.core.settings import Settings

BASE = {"HERALD_SECRET_KEY": "s" * 32}


def test_no_token_configured_lets_every_scrape_in():
    assert token_allowed(None, None) and token_allowed("Bearer anything", None)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic c2VjcmV0",
                                    "secret", "Bearer secret2", "Bearer secre", "Token secret"])
def test_anything_but_the_bearer_token_is_refused(header):
    assert not token_allowed(header, "secret")


@pytest.mark.parametrize("header", ["Bearer secret", "bearer secret", "Bearer  secret "])
def test_the_bearer_token_is_accepted(header):
    assert token_allowed(header, "secret")


def test_without_a_token_only_development_an_opt_out_or_a_private_listener_answers():
    deployed = Settings.from_env(BASE)
    assert not scrape_allowed(None, deployed) and not scrape_allowed("Bearer anything", deployed)
    assert scrape_allowed(None, deployed, private=True)  # a loopback listener (bridge, worker)
    assert scrape_allowed(None, Settings.from_env({**BASE, "HERALD_DEV": "1"}))
    assert scrape_allowed(None, Settings.from_env({**BASE, "HERALD_METRICS_PUBLIC": "1"}))


def test_a_token_set_is_required_everywhere():
    for extra in ({}, {"HERALD_DEV": "1"}, {"HERALD_METRICS_PUBLIC": "1"}):
        settings = Settings.from_env({**BASE, "HERALD_METRICS_TOKEN": "secret", **extra})
        assert not scrape_allowed(None, settings, private=True)
        assert scrape_allowed("Bearer secret", settings)
