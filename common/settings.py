"""The job's knobs: one pydantic-settings model with the seed's names (DESIGN.md §8).

Every field answers to its own name and to the seed's environment variable (`copies_m` or
PUM_COPIES_M). Two loaders, both refusing bad values with `InvalidInput`:

- `PumSettings.from_sources(yaml_path, environ, **overrides)`: file < environment < keywords.
- `PumSettings.from_spec(mapping)`: a plain mapping only; the environment is never read, so a
  server's own environment cannot silently change the jobs it is sent.

Calling `PumSettings(**kwargs)` validates the keywords alone (no environment, no .env file).
"""

from __future__ import annotations

import difflib
import json
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AliasChoices, AliasGenerator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pum.common.errors import InvalidInput

# One place for the field → environment variable table; the alias generator reads it.
ENV_NAMES: dict[str, str] = {
    "copies_m": "PUM_COPIES_M", "rounds_R": "PUM_ROUNDS_R",
    "alpha_min": "PUM_ALPHA_MIN", "alpha_max": "PUM_ALPHA_MAX",
    "eta_srv": "PUM_ETA_SRV", "theta_ref_beta": "PUM_THETA_REF_BETA",
    "server_center_clipping": "PUM_SERVER_CENTER_CLIP",
    "center_clip_C_per_layer": "PUM_CENTER_CLIP_C_PER_LAYER", "center_clip_C_global": "PUM_CENTER_CLIP_C_GLOBAL",
    "jitter_tau": "PUM_JITTER_TAU",
    "center_clip_quantile_q": "PUM_CENTER_CLIP_Q", "center_clip_quantile_kappa": "PUM_CENTER_CLIP_KAPPA",
    "center_clip_round_gamma": "PUM_CENTER_CLIP_GAMMA", "center_clip_ref_model_paths": "PUM_CENTER_CLIP_REF_MODELS",
    "per_layer_noise": "PUM_PER_LAYER_NOISE",
    "dp_epsilon": "DP_EPSILON", "dp_delta": "DP_DELTA", "dp_rdp_orders": "DP_RDP_ORDERS",
    "dp_per_layer_allocation": "DP_PER_LAYER_ALLOC",
    "dp_sensitivity_per_layer_l2": "DP_SENS_PER_LAYER_L2", "dp_sensitivity_total_l2": "DP_SENS_TOTAL_L2",
    "dp_use_worstcase_alpha": "DP_USE_WORSTCASE_ALPHA", "dp_alpha_policy": "DP_ALPHA_POLICY",
    "dp_conversion": "DP_CONVERSION", "dp_target": "DP_TARGET",
    "sigma": "PUM_SIGMA", "sigma_per_layer": "PUM_SIGMA_PER_LAYER", "noise_kappa": "PUM_NOISE_KAPPA",
    "noise_structure": "PUM_NOISE_STRUCTURE", "base_model": "PUM_BASE_MODEL",
    "inner_handler": "PUM_INNER_HANDLER", "local_epochs": "PUM_LOCAL_EPOCHS", "local_max_steps": "PUM_LOCAL_MAX_STEPS",
    "clip_update_norm": "PUM_CLIP_UPDATE_NORM", "clip_update_norm_per_layer": "PUM_CLIP_UPDATE_PER_LAYER",
    "use_orthogonal_reparam": "PUM_USE_REPARAM", "auto_advance": "PUM_AUTO_ADVANCE",
    "per_token_copy_cap": "PUM_PER_TOKEN_COPY_CAP", "max_copy_failures": "PUM_MAX_COPY_FAILURES",
    "retain": "PUM_RETAIN",
    "seed": "PUM_SEED", "prompt_format": "PUM_PROMPT_FORMAT",
}
_FIELD_OF_ENV = {env: field for field, env in ENV_NAMES.items()}
# Order grid of DESIGN.md §5: 1.25 … 5 in steps, every integer 6..63, then 128 and 256.
DEFAULT_RDP_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, *map(float, range(6, 64)), 128.0, 256.0]
DEFAULT_NOISE_KAPPA = 0.01  # the paper's "1%"
_NOISE_SCALES = ("sigma", "sigma_per_layer", "noise_kappa", "dp_epsilon")
_WHY = {"copies_m": "zero-sum noise needs at least two copies; start draws m noises of the model's size"}

# Bounds (README "Bounds of the settings"): each keeps the arithmetic finite in float32 and the work
# proportionate. `start` draws m standard normals per parameter (z̄ of the zero-sum noise) under the
# job's lock, so copies_m bounds how long an abort may wait behind it.
MAX_COPIES = 64
MAX_ROUNDS = 100
MAX_ALPHA = 100.0  # α ≤ 100: the weights 1/α_k stay within 1e-2 of each other's scale
MAX_NOISE = 100.0  # σ, τ, κ: 100 × a weight's scale already drowns the model; finite after α·σ·z in float32
MAX_NORM = 1e6  # clip thresholds and sensitivities (L2 norms of a model's tensors or updates)
MAX_GROUPS = 4096  # values given per layer group
MAX_PATHS = 16  # reference model folders
MAX_ORDER = 1e6  # Rényi orders
Pos = Annotated[float, Field(gt=0, le=MAX_NORM)]
NonNeg = Annotated[float, Field(ge=0, le=MAX_NOISE)]


class PumSettings(BaseSettings):
    """All knobs of one PUM job; frozen, unknown keys refused. Build it with a loader."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False,
        alias_generator=AliasGenerator(validation_alias=lambda name: AliasChoices(name, ENV_NAMES[name])),
    )

    copies_m: int = Field(4, ge=2, le=MAX_COPIES, description="perturbed copies m published per round; in [2, 64]")
    rounds_R: int = Field(2, ge=1, le=MAX_ROUNDS, description="rounds R of perturb, unlearn, merge; in [1, 100]")
    alpha_min: float = Field(1.0, ge=1, le=MAX_ALPHA, description="smallest secret noise multiplier α_k; in [1, 100]")
    alpha_max: float = Field(2.0, ge=1, le=MAX_ALPHA,
                             description="largest secret noise multiplier α_k (≥ alpha_min); in [1, 100]")
    eta_srv: float = Field(1.0, gt=0, le=10, description="server step size η_srv on the merged update; in (0, 10]")
    theta_ref_beta: float = Field(
        0.9, ge=0, le=1, description="EMA factor β of the clipping reference θ_ref; in [0, 1]")
    server_center_clipping: bool | None = Field(
        None, description="clip the published center around θ_ref; None = on when any C or sensitivity is given")
    center_clip_C_per_layer: Pos | Annotated[list[Pos], Field(max_length=MAX_GROUPS)] | None = Field(
        None, description="center clipping threshold C_ℓ: one value for every layer, or one per layer "
                          "(at most 4096); each in (0, 1000000]")
    center_clip_C_global: float | None = Field(
        None, gt=0, le=MAX_NORM, description="center clipping threshold, non-layer tensors; in (0, 1000000]")
    jitter_tau: float = Field(
        0.0, ge=0, le=MAX_NOISE, description="std τ of independent per-copy jitter ξ_k; in [0, 100]")
    center_clip_quantile_q: float = Field(
        0.95, ge=0.90, le=0.99, description="quantile q of the public C_ℓ policy; in [0.9, 0.99]")
    center_clip_quantile_kappa: float = Field(
        1.25, ge=1.1, le=1.5, description="factor κ_c of the public C_ℓ policy; in [1.1, 1.5]")
    center_clip_round_gamma: float = Field(
        1.3, gt=0, le=10, description="C_ℓ ← γ·C_ℓ after each round; in (0, 10]")
    center_clip_ref_model_paths: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=MAX_PATHS,
        description="public reference model folders for the quantile policy (at most 16)")
    per_layer_noise: bool = Field(True, description="one σ per layer group (else one σ for the model)")
    dp_epsilon: float | None = Field(
        None, gt=0, le=1000, description="target ε: calibrate σ by DP accounting; in (0, 1000]")
    dp_delta: float = Field(1e-5, ge=1e-30, lt=1, description="target δ of the DP guarantee; in [1e-30, 1)")
    dp_rdp_orders: list[Annotated[float, Field(gt=1, le=MAX_ORDER)]] = Field(
        default_factory=lambda: list(DEFAULT_RDP_ORDERS), min_length=1, max_length=256,
        description="Rényi orders λ searched (1 to 256 of them); each in (1, 1000000]")
    dp_per_layer_allocation: Literal["auto", "equalized", "varmin"] = Field(
        "auto", description="split of the privacy budget across layers")
    dp_sensitivity_per_layer_l2: list[Pos] | None = Field(
        None, max_length=MAX_GROUPS, description="L2 sensitivity per layer group (at most 4096); each in (0, 1000000]")
    dp_sensitivity_total_l2: float | None = Field(
        None, gt=0, le=MAX_NORM, description="total L2 sensitivity (single-σ mode); in (0, 1000000]")
    dp_use_worstcase_alpha: bool = Field(True, description="account with S_α = m/α_min² (else the average)")
    dp_alpha_policy: Literal["worstcase", "expected", "realized"] | None = Field(
        None, description="S_α policy; None = from dp_use_worstcase_alpha (worstcase, else expected)")
    dp_conversion: Literal["improved", "classic", "exact"] = Field("improved", description="RDP → (ε,δ) rule")
    dp_target: Literal["true_release", "seed_formula"] | None = Field(
        None, description="what dp_epsilon bounds: true_release = the true ε of all copies of every round "
                          "(σ_ℓ kept, jitter τ_ℓ calibrated), seed_formula = the formula that treats copies as "
                          "independent; None = true_release for zero_sum noise, seed_formula for independent")
    sigma: float | None = Field(
        None, ge=0, le=MAX_NOISE, description="manual noise std σ for every tensor; in [0, 100]")
    sigma_per_layer: (Annotated[list[NonNeg], Field(max_length=MAX_GROUPS)]
                      | Annotated[dict[Annotated[str, Field(max_length=200)], NonNeg], Field(max_length=MAX_GROUPS)]
                      | None) = Field(
        None, description="manual σ per layer group: a list, or a mapping of group name to σ (at most 4096); "
                          "each in [0, 100]")
    noise_kappa: float | None = Field(
        None, ge=0, le=MAX_NOISE,
        description=f"relative noise: σ_ℓ = κ·RMS(θ_ℓ − θ_base,ℓ), or κ·RMS(θ_ℓ) without a base; "
                    f"{DEFAULT_NOISE_KAPPA} when no other noise scale is set; in [0, 100]")
    noise_structure: Literal["zero_sum", "independent"] = Field("zero_sum", description="how copies' noises relate")
    base_model: str | None = Field(None, max_length=4096, description="folder of the public base model θ_base")
    inner_handler: str = Field(
        "GradDiff", min_length=1, max_length=100,
        description="inner unlearning method run by workers (a name of pum.common.methods_catalog)")
    local_epochs: float = Field(5, gt=0, le=1000, description="baseline epoch budget of the inner method; in (0, 1000]")
    local_max_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="steps per copy; None = baseline budget / R; in [1, 1000000]")
    clip_update_norm: float | None = Field(
        None, gt=0, le=MAX_NORM, description="global L2 clip of each aligned update; in (0, 1000000]")
    clip_update_norm_per_layer: float | None = Field(
        None, gt=0, le=MAX_NORM, description="per-layer L2 clip of each update; in (0, 1000000]")
    use_orthogonal_reparam: bool = Field(False, description="hide each copy behind secret orthogonal maps T_k")
    auto_advance: bool = Field(True, description="advance when all m copies are in; False = wait for an admin call")
    per_token_copy_cap: int | None = Field(
        None, ge=1, le=MAX_COPIES, description="most copies of one round one worker token may lease; it limits a "
                                               "token, not the data owner, who may hold many tokens (see token "
                                               "parties); in [1, 64]")
    retain: bool = Field(
        True, description="the data owner has a retain set; with false, a method whose retain weight α ≠ 0 "
                          "is refused at job creation (it would fail on every worker)")
    max_copy_failures: int = Field(
        3, ge=1, le=100, description="times one copy may be given back by its workers (a worker gives a copy back "
                                     "when it fails on it) before the job ends `failed` with their reasons; in [1, 100]")
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="how workers prompt: chat (the tokenizer's template, open-unlearning's TOFU prompt), "
                            "plain ('Question: …\\nAnswer:'), auto = chat when the tokenizer has a template")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="None = fresh secret randomness; an int makes α, seeds and transforms "
                                              "reproducible and predictable: refused unless the server runs with "
                                              "--dev; in [0, 9223372036854775807]")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        """Keywords only: the environment is read by `from_sources`, in its documented order."""
        return (init_settings,)

    @model_validator(mode="after")
    def _cross_field(self) -> PumSettings:
        problems = []
        if self.alpha_max < self.alpha_min:
            problems.append(f"alpha_max must be ≥ alpha_min (got alpha_max={self.alpha_max!r} "
                            f"< alpha_min={self.alpha_min!r})")
        given = [name for name in _NOISE_SCALES if getattr(self, name) is not None]
        if len(given) > 1:
            problems.append(f"set at most one noise scale of {', '.join(_NOISE_SCALES)} (got {' and '.join(given)})")
        policy = self.dp_alpha_policy
        if (policy is not None and "dp_use_worstcase_alpha" in self.model_fields_set
                and self.dp_use_worstcase_alpha != (policy == "worstcase")):
            problems.append(f"dp_alpha_policy={policy!r} contradicts dp_use_worstcase_alpha="
                            f"{self.dp_use_worstcase_alpha}: set only one of them")
        if problems:
            raise ValueError("\n".join(problems))
        # Resolve the derived defaults once, so every reader sees the same values.
        if not given:
            object.__setattr__(self, "noise_kappa", DEFAULT_NOISE_KAPPA)
        if self.dp_target is None:
            object.__setattr__(self, "dp_target", "true_release" if self.noise_structure == "zero_sum" else "seed_formula")
        if policy is None:
            object.__setattr__(self, "dp_alpha_policy", "worstcase" if self.dp_use_worstcase_alpha else "expected")
        else:
            object.__setattr__(self, "dp_use_worstcase_alpha", policy == "worstcase")
        return self

    @property
    def center_clipping_enabled(self) -> bool:
        """The explicit `server_center_clipping`, or (None) whether any threshold or sensitivity is given."""
        if self.server_center_clipping is not None:
            return self.server_center_clipping
        return any(v is not None for v in (self.center_clip_C_per_layer, self.center_clip_C_global,
                                           self.dp_sensitivity_per_layer_l2, self.dp_sensitivity_total_l2))

    @property
    def update_clipping_enabled(self) -> bool:
        """Whether the server clips uploaded updates (per layer group, in total, or both)."""
        return self.clip_update_norm_per_layer is not None or self.clip_update_norm is not None

    @property
    def noise_mode(self) -> Literal["manual", "manual_per_layer", "relative", "dp"]:
        """Which rule sets σ_ℓ (DESIGN.md §3 step 2)."""
        if self.dp_epsilon is not None:
            return "dp"
        if self.sigma is not None:
            return "manual"
        if self.sigma_per_layer is not None:
            return "manual_per_layer"
        return "relative"

    def to_public_dict(self) -> dict[str, Any]:
        """Every field by its name, JSON-able (note: includes `seed` when one is set)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> PumSettings:
        """Validate a plain mapping (field or environment names); the environment is never read."""
        if not isinstance(spec, Mapping):
            raise InvalidInput(f"settings must be a mapping of names to values (got {type(spec).__name__})")
        try:
            return cls.model_validate(_canonical(spec, "the settings"))
        except ValidationError as err:
            raise InvalidInput(describe_validation_error(err)) from err

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, environ: Mapping[str, str] | None = None,
                     *, file_settings: Mapping[str, Any] | None = None, **overrides: Any) -> PumSettings:
        """YAML file (or `file_settings`, a mapping already read from one), then environment variables
        (`environ`, else os.environ) over it, then `overrides`."""
        merged = _read_yaml(Path(yaml_path)) if yaml_path is not None else _canonical(file_settings or {}, "the file")
        merged.update(_read_env(os.environ if environ is None else environ))
        merged.update(_canonical(overrides, "the keyword overrides"))
        return cls.from_spec(merged)


def _canonical(mapping: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Key by field name; an environment name becomes its field. Unknown keys pass on, to be refused."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = _FIELD_OF_ENV.get(key, key)
        if name in out:
            raise InvalidInput(f"{name} is given twice in {where} (as {name} and {ENV_NAMES[name]}): keep one")
        out[name] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    """A top-level mapping of settings, or one nested under `pum:` (other top-level sections are ignored)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InvalidInput(f"cannot read settings file {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise InvalidInput(f"settings file {path} is not valid YAML: {err}") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise InvalidInput(f"settings file {path} must hold a mapping (got {type(data).__name__})")
    if "pum" in data:
        section, stray = data["pum"] or {}, sorted(str(k) for k in data if k in ENV_NAMES or k in _FIELD_OF_ENV)
        if not isinstance(section, dict):
            raise InvalidInput(f"settings file {path}: `pum:` must hold a mapping (got {type(section).__name__})")
        if stray:
            raise InvalidInput(f"settings file {path} sets {', '.join(stray)} outside `pum:`: move them under it")
        data = section
    return _canonical(data, f"settings file {path}")


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The seed's environment variables only, keyed by field; lists as JSON or comma-separated."""
    return {field: _parse_env(field, env, environ[env]) for field, env in ENV_NAMES.items() if env in environ}


def _parse_env(field: str, env: str, raw: str) -> Any:
    members = _union_members(PumSettings.model_fields[field].annotation)
    takes_list = any(get_origin(m) is list for m in members)
    takes_scalar = any(get_origin(m) not in (list, dict) and m is not type(None) for m in members)
    text = raw.strip()
    if text.lower() in ("", "none", "null") and type(None) in members:
        return None
    if text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"{env} ({field}) is not valid JSON (got {raw!r}): {err.msg}") from err
    if takes_list and ("," in text or not takes_scalar):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _union_members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (each without its Annotated bounds)."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return tuple(get_args(m)[0] if get_origin(m) is Annotated else m for m in members)


def _num(value: Any) -> str:
    return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _bounds_text(bounds: Mapping[str, Any]) -> str | None:
    """{'ge': 0, 'le': 1} → 'in [0, 1]'; {'gt': 0} → '> 0'."""
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'≥' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f"{'≤' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return None


def _field_bounds(field: str) -> dict[str, Any]:
    info = PumSettings.model_fields.get(field)
    keys = ("ge", "gt", "le", "lt")
    return {k: getattr(m, k) for m in (info.metadata if info else ()) for k in keys if hasattr(m, k)}


def _is_bound_error(e: Mapping[str, Any]) -> bool:
    return any(k in e.get("ctx", {}) for k in ("ge", "gt", "le", "lt"))


def describe_validation_error(err: ValidationError) -> str:
    """One line per bad field: its name, what is allowed and what was given.

    Of a union field's per-member errors only the range errors are kept when there are any
    (`center_clip_C_per_layer = -1` is out of range, not "not a list").
    """
    by_field: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        field = _FIELD_OF_ENV.get(str(e["loc"][0]), str(e["loc"][0])) if e["loc"] else ""
        by_field.setdefault(field, []).append(e)
    lines: list[str] = []
    for field, errs in by_field.items():
        if not field:  # a cross-field check: its message is already a sentence
            lines += [line for e in errs for line in e["msg"].removeprefix("Value error, ").splitlines()]
            continue
        errs = [e for e in errs if _is_bound_error(e)] or errs
        by_place: dict[str, list[dict[str, Any]]] = {}
        for e in errs:
            by_place.setdefault(field + "".join(f"[{p}]" for p in e["loc"][1:] if isinstance(p, int)), []).append(e)
        for place, group in by_place.items():
            first, got = group[0], repr(group[0]["input"])
            if first["type"] == "extra_forbidden":
                close = difflib.get_close_matches(place, [*ENV_NAMES, *_FIELD_OF_ENV], n=1)
                lines.append(f"unknown setting {place!r}" + (f": did you mean {close[0]!r}?" if close else ""))
            elif first["type"] == "literal_error":
                lines.append(f"{place} must be one of {first['ctx']['expected']} (got {got})")
            elif _is_bound_error(first):
                allowed = _bounds_text(_field_bounds(field) if place == field else {}) or _bounds_text(first["ctx"])
                why = _WHY.get(field)
                lines.append(f"{place} must be {allowed} (got {got})" + (f": {why}" if why else ""))
            else:
                lines.append(f"{place}: {' or '.join(dict.fromkeys(e['msg'] for e in group))} (got {got})")
    return "\n".join(lines)
