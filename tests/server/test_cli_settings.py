"""Every server setting is a `pum server` flag as well as an environment variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from pum.cli import build_parser
from pum.server.cli import SETTING_FLAGS, settings_from_args
from pum.server.config import ServerSettings

# A value for each field that differs from its default (tls: both files, or neither).
VALUES = {
    "state_dir": Path("/srv/pum/state"), "saves_dir": Path("/srv/pum/saves"), "host": "0.0.0.0", "port": 9123,
    "admin_token": "token-from-a-file", "dev_mode": True, "lease_ttl_s": 33.5, "upload_idle_timeout_s": 12.5,
    "max_header_bytes": 4096, "max_concurrent_copies": 3, "upload_threads": 4, "torch_threads": 2,
    "tls_certfile": Path("/srv/pum/cert.pem"), "tls_keyfile": Path("/srv/pum/key.pem"), "device": "cuda:1",
    "send_timeout_s": 4.5, "header_timeout_s": 2.5, "body_timeout_s": 6.0, "max_json_body_bytes": 65536,
    "max_connections": 300, "lease_max_age_s": 3600.0, "shutdown_grace_s": 1.5,
}


def test_every_setting_has_a_flag_that_sets_it(tmp_path, monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("PUM_SERVER_") or name == "PUM_ADMIN_TOKEN":
            monkeypatch.delenv(name)
    fields = set(ServerSettings.model_fields)
    assert fields == set(SETTING_FLAGS), f"fields without a flag: {fields - set(SETTING_FLAGS)}"
    assert fields == set(VALUES), "give the test a value for each new setting"
    (tmp_path / "token").write_text("token-from-a-file\n")
    argv = ["server"]
    for field, (flag, options) in SETTING_FLAGS.items():
        if options.get("action") == "store_const":
            argv.append(flag)
        else:
            argv += [flag, str(tmp_path / "token") if field == "admin_token" else str(VALUES[field])]
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    for field, expected in VALUES.items():
        got = getattr(settings, field)
        got = got.get_secret_value() if field == "admin_token" else got
        assert got == expected and got != ServerSettings.model_fields[field].default, field


@pytest.mark.parametrize("field", sorted(SETTING_FLAGS))
def test_each_flag_has_help_that_names_its_variable(field):
    flag, options = SETTING_FLAGS[field]
    variable = "PUM_ADMIN_TOKEN" if field == "admin_token" else f"PUM_SERVER_{field.upper()}"
    assert variable in options["help"], (flag, options["help"])


def test_a_flag_wins_over_the_variable_and_the_variable_fills_the_rest(monkeypatch):
    monkeypatch.setenv("PUM_SERVER_LEASE_TTL_S", "40")
    monkeypatch.setenv("PUM_SERVER_UPLOAD_THREADS", "5")
    monkeypatch.setenv("PUM_SERVER_DEV_MODE", "true")
    settings = settings_from_args(build_parser().parse_args(["server", "--lease-ttl", "7"]))
    assert settings.lease_ttl_s == 7 and settings.upload_threads == 5 and settings.dev_mode
