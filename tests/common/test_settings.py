"""PumSettings: names, defaults, ranges and the file < environment < keywords order (DESIGN.md §8)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pum.common.errors import InvalidInput
from pum.common.settings import ENV_NAMES, PumSettings, describe_validation_error

# (field, environment variable, a valid raw env value, the value it must parse to).
# Kept here on purpose: renaming a variable in the module must fail this test.
TABLE = [
    ("copies_m", "PUM_COPIES_M", "6", 6),
    ("rounds_R", "PUM_ROUNDS_R", "3", 3),
    ("alpha_min", "PUM_ALPHA_MIN", "1.5", 1.5),
    ("alpha_max", "PUM_ALPHA_MAX", "3", 3.0),
    ("eta_srv", "PUM_ETA_SRV", "0.5", 0.5),
    ("theta_ref_beta", "PUM_THETA_REF_BETA", "0.5", 0.5),
    ("server_center_clipping", "PUM_SERVER_CENTER_CLIP", "true", True),
    ("center_clip_C_per_layer", "PUM_CENTER_CLIP_C_PER_LAYER", "0.5", 0.5),
    ("center_clip_C_global", "PUM_CENTER_CLIP_C_GLOBAL", "2", 2.0),
    ("jitter_tau", "PUM_JITTER_TAU", "0.01", 0.01),
    ("center_clip_quantile_q", "PUM_CENTER_CLIP_Q", "0.9", 0.9),
    ("center_clip_quantile_kappa", "PUM_CENTER_CLIP_KAPPA", "1.5", 1.5),
    ("center_clip_round_gamma", "PUM_CENTER_CLIP_GAMMA", "1.1", 1.1),
    ("center_clip_ref_model_paths", "PUM_CENTER_CLIP_REF_MODELS", "/m/a", ["/m/a"]),
    ("per_layer_noise", "PUM_PER_LAYER_NOISE", "false", False),
    ("dp_epsilon", "DP_EPSILON", "4", 4.0),
    ("dp_delta", "DP_DELTA", "1e-6", 1e-6),
    ("dp_rdp_orders", "DP_RDP_ORDERS", "2", [2.0]),
    ("dp_per_layer_allocation", "DP_PER_LAYER_ALLOC", "varmin", "varmin"),
    ("dp_sensitivity_per_layer_l2", "DP_SENS_PER_LAYER_L2", "0.5", [0.5]),
    ("dp_sensitivity_total_l2", "DP_SENS_TOTAL_L2", "1.5", 1.5),
    ("dp_use_worstcase_alpha", "DP_USE_WORSTCASE_ALPHA", "0", False),
    ("dp_alpha_policy", "DP_ALPHA_POLICY", "realized", "realized"),
    ("dp_target", "DP_TARGET", "seed_formula", "seed_formula"),
    ("dp_conversion", "DP_CONVERSION", "exact", "exact"),
    ("sigma", "PUM_SIGMA", "0.001", 0.001),
    ("sigma_per_layer", "PUM_SIGMA_PER_LAYER", "0.1", [0.1]),
    ("noise_kappa", "PUM_NOISE_KAPPA", "0.1", 0.1),
    ("noise_structure", "PUM_NOISE_STRUCTURE", "independent", "independent"),
    ("base_model", "PUM_BASE_MODEL", "/models/base", "/models/base"),
    ("inner_handler", "PUM_INNER_HANDLER", "NPO", "NPO"),
    ("local_epochs", "PUM_LOCAL_EPOCHS", "2.5", 2.5),
    ("local_max_steps", "PUM_LOCAL_MAX_STEPS", "10", 10),
    ("clip_update_norm", "PUM_CLIP_UPDATE_NORM", "1", 1.0),
    ("clip_update_norm_per_layer", "PUM_CLIP_UPDATE_PER_LAYER", "0.25", 0.25),
    ("use_orthogonal_reparam", "PUM_USE_REPARAM", "yes", True),
    ("auto_advance", "PUM_AUTO_ADVANCE", "false", False),
    ("per_token_copy_cap", "PUM_PER_TOKEN_COPY_CAP", "1", 1),
    ("max_copy_failures", "PUM_MAX_COPY_FAILURES", "5", 5),
    ("retain", "PUM_RETAIN", "false", False),
    ("seed", "PUM_SEED", "1234", 1234),
    ("prompt_format", "PUM_PROMPT_FORMAT", "chat", "chat"),
]

GRID = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, *range(6, 64), 128, 256]


def test_table_covers_every_field_and_env_name():
    assert {f for f, *_ in TABLE} == set(PumSettings.model_fields)
    assert {f: e for f, e, *_ in TABLE} == ENV_NAMES


def test_defaults():
    s = PumSettings.from_spec({})
    assert (s.copies_m, s.rounds_R, s.alpha_min, s.alpha_max, s.eta_srv, s.theta_ref_beta) == (4, 2, 1.0, 2.0, 1.0, 0.9)
    assert s.server_center_clipping is None and s.center_clipping_enabled is False
    assert s.center_clip_C_per_layer is None and s.center_clip_C_global is None and s.jitter_tau == 0.0
    assert (s.center_clip_quantile_q, s.center_clip_quantile_kappa, s.center_clip_round_gamma) == (0.95, 1.25, 1.3)
    assert s.center_clip_ref_model_paths == [] and s.per_layer_noise is True
    assert s.dp_epsilon is None and s.dp_delta == 1e-5 and s.dp_rdp_orders == GRID
    assert (s.dp_per_layer_allocation, s.dp_conversion) == ("auto", "improved")
    assert s.dp_sensitivity_per_layer_l2 is None and s.dp_sensitivity_total_l2 is None
    assert s.dp_use_worstcase_alpha is True and s.dp_alpha_policy == "worstcase"
    assert s.sigma is None and s.sigma_per_layer is None
    assert s.noise_kappa == 0.01 and s.noise_mode == "relative"
    assert s.noise_structure == "zero_sum" and s.base_model is None and s.inner_handler == "GradDiff"
    assert s.local_epochs == 5 and s.local_max_steps is None
    assert s.clip_update_norm is None and s.clip_update_norm_per_layer is None
    assert s.use_orthogonal_reparam is False and s.auto_advance is True
    assert s.per_token_copy_cap is None and s.seed is None


def test_every_field_has_a_description():
    assert all(info.description for info in PumSettings.model_fields.values())


@pytest.mark.parametrize(("field", "env", "raw", "expected"), TABLE, ids=[e for _, e, *_ in TABLE])
def test_env_name_maps_to_its_field(field, env, raw, expected):
    assert getattr(PumSettings.from_sources(environ={env: raw}), field) == expected


@pytest.mark.parametrize(("field", "env", "raw", "expected"), TABLE, ids=[f for f, *_ in TABLE])
def test_field_and_env_name_both_accepted_in_a_spec(field, env, raw, expected):
    assert getattr(PumSettings.from_spec({field: expected}), field) == expected
    assert getattr(PumSettings.from_spec({env: expected}), field) == expected


def test_field_given_by_both_names_in_one_source_is_refused():
    with pytest.raises(InvalidInput, match="copies_m is given twice"):
        PumSettings.from_spec({"copies_m": 3, "PUM_COPIES_M": 5})


def test_yaml_then_env_then_keywords(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("copies_m: 3\nrounds_R: 5\nPUM_ETA_SRV: 0.5\njitter_tau: 0.2\n")
    env = {"PUM_ROUNDS_R": "6", "PUM_JITTER_TAU": "0.3", "UNRELATED": "x", "copies_m": "9"}
    s = PumSettings.from_sources(path, environ=env, jitter_tau=0.4)
    assert s.copies_m == 3  # from the file; a field name in the environment does not count
    assert s.eta_srv == 0.5  # the file may use environment names too
    assert s.rounds_R == 6  # the environment overrides the file
    assert s.jitter_tau == 0.4  # keywords override both


def test_yaml_nested_under_pum(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  name: tiny\npum:\n  copies_m: 5\n  DP_EPSILON: 4\n")
    s = PumSettings.from_sources(str(path), environ={})
    assert (s.copies_m, s.dp_epsilon, s.noise_mode) == (5, 4.0, "dp")


def test_yaml_setting_outside_pum_section_is_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("rounds_R: 3\npum:\n  copies_m: 5\n")
    with pytest.raises(InvalidInput, match="rounds_R outside `pum:`"):
        PumSettings.from_sources(path, environ={})


@pytest.mark.parametrize(("text", "match"), [("- 1\n- 2\n", "must hold a mapping"), ("a: [1\n", "not valid YAML")])
def test_bad_yaml_file_is_refused(tmp_path, text, match):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=match):
        PumSettings.from_sources(path, environ={})


def test_missing_yaml_file_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="cannot read settings file"):
        PumSettings.from_sources(tmp_path / "absent.yaml", environ={})


def test_invalid_value_in_yaml_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("pum:\n  copies_m: 1\n")
    with pytest.raises(InvalidInput, match=r"copies_m must be in \[2, 64\]"):
        PumSettings.from_sources(path, environ={})


def test_from_spec_and_constructor_ignore_the_environment(monkeypatch):
    monkeypatch.setenv("PUM_COPIES_M", "7")
    monkeypatch.setenv("DP_EPSILON", "2")
    assert PumSettings.from_spec({}).copies_m == 4
    assert PumSettings.from_spec({}).dp_epsilon is None
    assert PumSettings().copies_m == 4
    assert PumSettings.from_sources().copies_m == 7  # only from_sources reads os.environ


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"copies_m": 1}, "copies_m must be in [2, 64] (got 1): zero-sum noise needs at least two copies"),
        ({"rounds_R": 0}, "rounds_R must be in [1, 100] (got 0)"),
        ({"alpha_min": 0.5}, "alpha_min must be in [1, 100] (got 0.5)"),
        ({"alpha_min": 2.0, "alpha_max": 1.5}, "alpha_max must be ≥ alpha_min (got alpha_max=1.5 < alpha_min=2.0)"),
        ({"theta_ref_beta": 2}, "theta_ref_beta must be in [0, 1] (got 2)"),
        ({"center_clip_quantile_q": 0.5}, "center_clip_quantile_q must be in [0.9, 0.99] (got 0.5)"),
        ({"center_clip_quantile_kappa": 2}, "center_clip_quantile_kappa must be in [1.1, 1.5] (got 2)"),
        ({"dp_delta": 0}, "dp_delta must be in [1e-30, 1) (got 0)"),
        ({"dp_delta": 1}, "dp_delta must be in [1e-30, 1) (got 1)"),
        ({"eta_srv": 0}, "eta_srv must be in (0, 10] (got 0)"),
        ({"jitter_tau": -0.1}, "jitter_tau must be in [0, 100] (got -0.1)"),
        ({"dp_rdp_orders": [2, 0.5]}, "dp_rdp_orders[1] must be > 1 (got 0.5)"),
        ({"center_clip_C_per_layer": -1}, "center_clip_C_per_layer must be > 0 (got -1)"),
        ({"center_clip_C_per_layer": [1, -2]}, "center_clip_C_per_layer[1] must be > 0 (got -2)"),
        ({"dp_conversion": "rdp"}, "dp_conversion must be one of 'improved', 'classic' or 'exact' (got 'rdp')"),
        ({"dp_per_layer_allocation": "x"}, "dp_per_layer_allocation must be one of 'auto', 'equalized' or 'varmin'"),
        ({"noise_structure": "sum"}, "noise_structure must be one of 'zero_sum' or 'independent' (got 'sum')"),
        ({"per_token_copy_cap": 0}, "per_token_copy_cap must be in [1, 64] (got 0)"),
        ({"copies": 3}, "unknown setting 'copies': did you mean 'copies_m'?"),
        ({"PUM_COPES_M": 3}, "unknown setting 'PUM_COPES_M': did you mean 'PUM_COPIES_M'?"),
        ({"copies_m": "many"}, "copies_m: Input should be a valid integer"),
    ],
)
def test_range_refusal_names_field_and_range(spec, expected):
    with pytest.raises(InvalidInput) as info:
        PumSettings.from_spec(spec)
    assert expected in str(info.value)


def test_every_bad_field_is_named_at_once():
    with pytest.raises(InvalidInput) as info:
        PumSettings.from_spec({"copies_m": 1, "dp_delta": 2, "dp_conversion": "x"})
    assert str(info.value).count("\n") == 2
    assert all(name in str(info.value) for name in ("copies_m", "dp_delta", "dp_conversion"))


def test_describe_validation_error_maps_env_names_to_fields():
    with pytest.raises(ValidationError) as info:
        PumSettings.model_validate({"PUM_COPIES_M": 1})
    assert describe_validation_error(info.value).startswith("copies_m must be in [2, 64] (got 1)")


@given(st.integers(max_value=1))
def test_any_too_small_copies_m_is_explained(m):
    with pytest.raises(InvalidInput, match=rf"copies_m must be in \[2, 64\] \(got {m}\): zero-sum noise"):
        PumSettings.from_spec({"copies_m": m})


@pytest.mark.parametrize(
    "spec",
    [{"sigma": 0.1, "dp_epsilon": 1}, {"sigma": 0.1, "noise_kappa": 0.1},
     {"sigma_per_layer": [0.1], "noise_kappa": 0.1}, {"sigma": 0, "sigma_per_layer": {"a": 0.1}, "dp_epsilon": 1}],
)
def test_two_noise_scales_refused(spec):
    with pytest.raises(InvalidInput) as info:
        PumSettings.from_spec(spec)
    assert "at most one noise scale" in str(info.value)
    assert all(name in str(info.value).split("(got")[1] for name in spec)


@pytest.mark.parametrize(
    ("spec", "mode", "kappa"),
    [({}, "relative", 0.01), ({"noise_kappa": 0.1}, "relative", 0.1), ({"sigma": 0.0}, "manual", None),
     ({"sigma_per_layer": {"model.layers.0": 0.2}}, "manual_per_layer", None), ({"dp_epsilon": 8}, "dp", None)],
)
def test_noise_mode_and_default_kappa(spec, mode, kappa):
    s = PumSettings.from_spec(spec)
    assert (s.noise_mode, s.noise_kappa) == (mode, kappa)


@pytest.mark.parametrize(
    ("spec", "enabled"),
    [({}, False), ({"center_clip_C_per_layer": 1.0}, True), ({"center_clip_C_per_layer": [1.0, 2.0]}, True),
     ({"center_clip_C_global": 1.0}, True), ({"dp_sensitivity_per_layer_l2": [0.5]}, True),
     ({"dp_sensitivity_total_l2": 2.0}, True), ({"server_center_clipping": True}, True),
     ({"server_center_clipping": False, "center_clip_C_global": 1.0}, False)],
)
def test_center_clipping_enabled_rule(spec, enabled):
    assert PumSettings.from_spec(spec).center_clipping_enabled is enabled


@pytest.mark.parametrize(
    ("use_worstcase", "policy", "expected"),
    [(None, None, "worstcase"), (False, None, "expected"), (None, "realized", "realized"),
     (False, "expected", "expected"), (True, "worstcase", "worstcase")],
)
def test_dp_alpha_policy_derivation(use_worstcase, policy, expected):
    spec = {k: v for k, v in (("dp_use_worstcase_alpha", use_worstcase), ("dp_alpha_policy", policy)) if v is not None}
    s = PumSettings.from_spec(spec)
    assert s.dp_alpha_policy == expected and s.dp_use_worstcase_alpha == (expected == "worstcase")


def test_contradicting_alpha_policy_is_refused():
    with pytest.raises(InvalidInput, match="contradicts dp_use_worstcase_alpha"):
        PumSettings.from_spec({"dp_use_worstcase_alpha": True, "dp_alpha_policy": "expected"})


@pytest.mark.parametrize(
    ("env", "raw", "field", "expected"),
    [
        ("DP_RDP_ORDERS", "2, 4,8", "dp_rdp_orders", [2.0, 4.0, 8.0]),
        ("DP_RDP_ORDERS", "[2, 4.5]", "dp_rdp_orders", [2.0, 4.5]),
        ("PUM_CENTER_CLIP_REF_MODELS", "/m/a,/m/b", "center_clip_ref_model_paths", ["/m/a", "/m/b"]),
        ("PUM_CENTER_CLIP_REF_MODELS", '["/m/a", "/m/b"]', "center_clip_ref_model_paths", ["/m/a", "/m/b"]),
        ("PUM_CENTER_CLIP_REF_MODELS", "", "center_clip_ref_model_paths", []),
        ("PUM_CENTER_CLIP_C_PER_LAYER", "0.5,0.7", "center_clip_C_per_layer", [0.5, 0.7]),
        ("PUM_CENTER_CLIP_C_PER_LAYER", "[0.5]", "center_clip_C_per_layer", [0.5]),
        ("DP_SENS_PER_LAYER_L2", "1,2", "dp_sensitivity_per_layer_l2", [1.0, 2.0]),
        ("PUM_SIGMA_PER_LAYER", "0.1,0.2", "sigma_per_layer", [0.1, 0.2]),
        ("PUM_SIGMA_PER_LAYER", '{"model.layers.0": 0.1}', "sigma_per_layer", {"model.layers.0": 0.1}),
        ("PUM_SERVER_CENTER_CLIP", "null", "server_center_clipping", None),
        ("PUM_SEED", "", "seed", None),
    ],
)
def test_env_list_and_null_parsing(env, raw, field, expected):
    assert getattr(PumSettings.from_sources(environ={env: raw}), field) == expected


def test_env_bad_json_and_bad_value_are_refused():
    with pytest.raises(InvalidInput, match=r"DP_RDP_ORDERS \(dp_rdp_orders\) is not valid JSON"):
        PumSettings.from_sources(environ={"DP_RDP_ORDERS": "[2, 3"})
    with pytest.raises(InvalidInput, match=r"dp_rdp_orders\[0\] must be > 1 \(got '0.5'\)"):
        PumSettings.from_sources(environ={"DP_RDP_ORDERS": "0.5,2"})


def test_frozen():
    s = PumSettings.from_spec({})
    with pytest.raises(ValidationError):
        s.copies_m = 5


def test_public_dict_is_json_and_round_trips():
    s = PumSettings.from_spec({"sigma_per_layer": {"a": 0.1}, "dp_alpha_policy": "realized",
                               "center_clip_ref_model_paths": ["/m/a"], "seed": 3})
    public = s.to_public_dict()
    assert set(public) == set(PumSettings.model_fields)
    assert PumSettings.from_spec(json.loads(json.dumps(public))) == s


def test_non_finite_values_refused():
    with pytest.raises(InvalidInput, match="alpha_max"):
        PumSettings.from_spec({"alpha_max": float("inf")})
