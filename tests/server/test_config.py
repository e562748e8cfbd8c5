"""Which environment variables each server setting reads: PUM_SERVER_<FIELD>, except the admin
token: PUM_ADMIN_TOKEN (shared with `pum admin`); never a bare name (ADMIN_TOKEN, PORT) another
program may have set."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pum.server.config import ServerSettings

VALUES = {  # field → an environment value and how it reads back
    "state_dir": ("/srv/state", "/srv/state"), "saves_dir": ("/srv/saves", "/srv/saves"), "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9001", 9001), "admin_token": ("t0ken", "t0ken"), "dev_mode": ("true", True),
    "lease_ttl_s": ("7.5", 7.5), "upload_idle_timeout_s": ("3", 3.0), "max_header_bytes": ("4096", 4096),
    "max_concurrent_copies": ("5", 5), "upload_threads": ("4", 4), "torch_threads": ("3", 3), "tls_certfile": ("/c.pem", "/c.pem"),
    "tls_keyfile": ("/k.pem", "/k.pem"), "device": ("cuda:1", "cuda:1"),
    "send_timeout_s": ("4", 4.0), "header_timeout_s": ("2.5", 2.5), "body_timeout_s": ("6", 6.0),
    "max_json_body_bytes": ("65536", 65536), "max_connections": ("300", 300), "lease_max_age_s": ("3600", 3600.0),
    "shutdown_grace_s": ("1.5", 1.5),
}
READS = {field: {f"PUM_SERVER_{field.upper()}"} for field in VALUES} | {"admin_token": {"PUM_ADMIN_TOKEN"}}


def read_back(settings: ServerSettings, field: str):
    value = getattr(settings, field)
    value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return str(value) if field.endswith(("_dir", "file")) else value


@pytest.fixture
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("PUM_") or name.upper() in {f.upper() for f in ServerSettings.model_fields} | {"ADMIN_TOKEN"}:
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_setting_is_covered():
    assert set(VALUES) == set(ServerSettings.model_fields)


@pytest.mark.parametrize("field", sorted(VALUES))
def test_each_setting_reads_its_prefixed_variable_and_nothing_else(clean_environment, field):
    env, expected = VALUES[field]
    candidates = {field.upper(), f"PUM_{field.upper()}", f"PUM_SERVER_{field.upper()}", "ADMIN_TOKEN", "PUM_ADMIN_TOKEN",
                  "SERVER_" + field.upper()}
    # the other half of a pair the validator needs: given as a keyword, so it does not count as read
    base = {"dev_mode": True} if field != "dev_mode" else {"admin_token": "kw"}
    if field in ("tls_certfile", "tls_keyfile"):
        base["tls_keyfile" if field == "tls_certfile" else "tls_certfile"] = "/other.pem"
    read = set()
    for name in sorted(candidates):
        clean_environment.setenv(name, env)
        try:
            if read_back(ServerSettings(**base), field) == expected:
                read.add(name)
        except ValidationError:  # half a TLS pair: the variable was not read
            pass
        clean_environment.delenv(name)
    assert read == READS[field]


def test_keywords_use_the_field_names(clean_environment):
    settings = ServerSettings(admin_token="kw", port=1234)
    assert settings.admin_token.get_secret_value() == "kw" and settings.port == 1234


def test_a_server_without_admin_token_or_dev_mode_is_refused(clean_environment):
    clean_environment.setenv("ADMIN_TOKEN", "ignored")
    with pytest.raises(ValueError, match="PUM_ADMIN_TOKEN"):
        ServerSettings()
