"""Everything a job's files need at creation: θ, the public files, the base model, C_ℓ, the key.

Kept apart from the service so creation reads as one list of steps, each refusing bad input
with a message before anything is stored.
"""

from __future__ import annotations

from pathlib import Path

from pum.common.center import check_same_layout, clip_thresholds, quantile_thresholds
from pum.common.errors import InvalidInput
from pum.common.hub import resolve_local
from pum.common.layers import group_names
from pum.common.noise import job_key_from_seed, new_job_key
from pum.common.prompts import folder_has_chat_template
from pum.common.reparam import adapter_for
from pum.common.settings import PumSettings

from .job_files import JobFiles
from .model_io import ingest_model, ingest_weights, input_shard_bytes
from .rounds import dp_noise, group_sizes, manual_per_layer_sigmas


def create_job_files(files: JobFiles, source: Path, settings: PumSettings) -> dict:
    """Write the job's files; returns what the job spec records (dtypes, C_ℓ, base present)."""
    dtypes = ingest_model(source, files)
    if settings.prompt_format == "chat" and not folder_has_chat_template(source):
        raise InvalidInput("prompt_format is chat, but the model's tokenizer has no chat template: "
                           "use prompt_format plain (or auto)")
    has_base = bool(settings.base_model)
    with files.read(files.theta(1)) as theta:
        groups = group_names(theta.names)
        sizes = group_sizes(theta.infos)
        if has_base:
            ingest_weights(resolve_local(settings.base_model, "base_model"), files, files.BASE, "base_model")
            with files.read(files.BASE) as base:
                check_same_layout(theta, base, f"base_model {settings.base_model}")
        clip_norms = center_clip_norms(settings, groups, files, has_base)
        if settings.use_orthogonal_reparam:  # refused now, never silently skipped later
            config = files.public_config()
            adapter_for(config).check_layout(config, theta.infos)
    if clip_norms is not None:  # θ_ref starts at θ_base; without a base, at θ (no bound: see the report)
        files.copy(files.BASE if has_base else files.theta(1), files.theta_ref(1))
    key = job_key_from_seed(settings.seed) if settings.seed is not None else new_job_key()
    files.write_key(key)
    if settings.noise_mode == "dp":  # an impossible calibration is refused now, not at the start
        check_dp_clipping(clip_norms, groups)
        dp_noise(sizes, key, settings, clip_norms, 1)
    if settings.noise_mode == "manual_per_layer":  # likewise a σ list that does not fit the model
        manual_per_layer_sigmas(settings.sigma_per_layer, groups)
    return {"dtypes": dtypes, "clip_norms": clip_norms, "has_base": has_base, "group_sizes": sizes,
            "shard_bytes": input_shard_bytes(source)}


def check_dp_clipping(clip_norms: dict[str, float | None] | None, groups: list[str]) -> None:
    """A DP job needs every layer group's center clipped: an unclipped group has no sensitivity bound."""
    if clip_norms is None:
        raise InvalidInput("dp_epsilon needs center clipping (center_clip_C_per_layer and center_clip_C_global, "
                           "DP sensitivities, or the quantile policy): without it nothing bounds the sensitivity")
    unclipped = [g for g in groups if clip_norms.get(g) is None]
    if unclipped:
        raise InvalidInput(
            f"dp_epsilon needs a clipping norm for every layer group; {', '.join(unclipped)} would be published "
            "unclipped (no sensitivity bound): set center_clip_C_global for the embeddings, final norm and lm_head")


def center_clip_norms(settings: PumSettings, groups: list[str], files: JobFiles,
                      has_base: bool) -> dict[str, float | None] | None:
    """C_ℓ per group, or None when center clipping is off (DESIGN.md §4 "Clipping").

    From explicit C values; else from per-layer DP sensitivities (Δ̄_ℓ = 2·C_ℓ); else from the
    public-only quantile policy over reference models (needs a base model).
    """
    if not settings.center_clipping_enabled:
        return None
    if settings.center_clip_C_per_layer is not None or settings.center_clip_C_global is not None:
        return clip_thresholds(groups, settings.center_clip_C_per_layer, settings.center_clip_C_global)
    if settings.dp_sensitivity_per_layer_l2 is not None:
        halves = [s / 2 for s in settings.dp_sensitivity_per_layer_l2]
        if len(halves) != len(groups):
            raise InvalidInput(
                f"dp_sensitivity_per_layer_l2 has {len(halves)} values; give one per group ({len(groups)}: {groups})"
            )
        return dict(zip(groups, halves))
    if settings.dp_sensitivity_total_l2 is not None:
        return {g: settings.dp_sensitivity_total_l2 / 2 / len(groups) ** 0.5 for g in groups}
    if settings.center_clip_ref_model_paths:
        if not has_base:
            raise InvalidInput("center_clip_ref_model_paths: the quantile policy needs base_model (a public base)")
        names = [files.reference(i) for i in range(len(settings.center_clip_ref_model_paths))]
        references = []
        try:
            for name, path in zip(names, settings.center_clip_ref_model_paths):
                ingest_weights(resolve_local(path, "reference model"), files, name, f"reference model {path}")
                references.append(files.read(name))
            with files.read(files.BASE) as base:
                for ref in references:
                    check_same_layout(base, ref, "reference model")
                return quantile_thresholds(
                    base, references, settings.center_clip_quantile_q, settings.center_clip_quantile_kappa
                )
        finally:
            for ref in references:
                ref.close()
            for name in names:
                files.delete(name)
    raise InvalidInput(
        "server_center_clipping is on but no threshold is given: set center_clip_C_per_layer / "
        "center_clip_C_global, dp sensitivities, or center_clip_ref_model_paths with a base_model"
    )
