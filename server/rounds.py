"""One round on disk: noise scales, z̄, published copies, the step over the accepted uploads.

Every read and write goes through the job's `JobFiles` (layout in `pum.server.job_files`).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from pum.common.aggregate import (
    WeightedUpdate, apply_merged, group_sum_squares, harmonic_weight, sum_of_squares, update_clip_scales,
)
from pum.common.center import write_center, write_reference_ema
from pum.common.codec import DTYPES, SafetensorsFile, TensorInfo, stream_safetensors_from
from pum.common.errors import Conflict, InvalidInput
from pum.common.layers import group_names, layer_group
from pum.common.noise import CopyNoise, draw_alphas, harmonic_noise, mean_base_noise, relative_sigmas
from pum.common.reparam import CopyTransform, adapter_for
from pum.common.privacy.target import RoundNoise, calibrate_round
from pum.common.schemas import UploadKind
from pum.common.settings import PumSettings

from .job_files import JobFiles
from .store.records import JobSpec


def noise_scales(theta: SafetensorsFile, base: SafetensorsFile | None, settings: PumSettings) -> dict[str, float]:
    """σ_ℓ per layer group, for the manual and relative modes (DESIGN.md §3.2).

    Relative: σ_ℓ = κ·RMS(θ_ℓ − θ_base,ℓ), or κ·RMS(θ_ℓ) without a base model.
    """
    groups = group_names(theta.names)
    mode = settings.noise_mode
    if mode == "manual":
        return {g: settings.sigma for g in groups}
    if mode == "manual_per_layer":
        return manual_per_layer_sigmas(settings.sigma_per_layer, groups)
    if mode == "relative":
        sums, counts = dict.fromkeys(groups, 0.0), dict.fromkeys(groups, 0)
        for info in theta.infos:
            group = layer_group(info.name)
            value = theta.read(info.name)
            sums[group] += sum_of_squares(value - base.read(info.name) if base else value)
            counts[group] += info.numel
        return relative_sigmas(sums, counts, settings.noise_kappa, settings.per_layer_noise)
    raise ValueError(f"noise mode {mode!r} is not supported by this server yet")


def group_sizes(infos) -> dict[str, int]:
    """d_ℓ: parameters per layer group."""
    sizes: dict[str, int] = {}
    for info in infos:
        sizes[layer_group(info.name)] = sizes.get(layer_group(info.name), 0) + info.numel
    return sizes


def dp_noise(
    sizes: dict[str, int], key: bytes, settings: PumSettings, clip_norms: dict[str, float | None] | None, round_: int
) -> RoundNoise:
    """σ_ℓ and τ_ℓ for (dp_epsilon, dp_delta) over R rounds and `dp_target`, with this round's C_ℓ
    and realized α. `sizes` d_ℓ per layer group (the job spec's `group_sizes`)."""
    clips = clip_thresholds_for_round(clip_norms, settings, round_) if clip_norms else None
    alphas = list(round_alphas(key, round_, settings.copies_m, settings.alpha_min, settings.alpha_max))
    return calibrate_round(settings, sizes, clips, alphas)


def round_noise(rnd, settings: PumSettings) -> tuple[dict[str, float], dict[str, float]]:
    """(σ_ℓ, τ_ℓ) of a stored round; a round stored before τ_ℓ was kept used jitter_tau everywhere."""
    return rnd.sigmas, rnd.taus or dict.fromkeys(rnd.sigmas, settings.jitter_tau)


def clip_thresholds_for_round(clip_norms: dict[str, float | None], settings: PumSettings, round_: int) -> dict[str, float | None]:
    """C_ℓ·γ^(r−1): the thresholds grow by γ each round from round 2 (DESIGN.md §4)."""
    growth = settings.center_clip_round_gamma ** (round_ - 1)
    return {g: (c * growth if c is not None else None) for g, c in clip_norms.items()}


def prepare_round(files: JobFiles, key: bytes, spec: JobSpec, round_: int) -> tuple[dict[str, float], dict[str, float]]:
    """Write the round's center (when clipping) and z̄; returns (σ_ℓ, τ_ℓ). Idempotent: a crash redoes it."""
    settings, clip_norms = spec.settings, spec.clip_norms
    if spec.clipping:
        thresholds = clip_thresholds_for_round(clip_norms, settings, round_)
        with files.read(files.theta(round_)) as theta, files.read(files.theta_ref(round_)) as ref, \
                files.create(files.clipped_center(round_)) as out:
            write_center(theta, ref, thresholds, out.file)
    base = files.read(files.BASE) if spec.has_base else None
    try:
        with files.read(files.theta(round_)) as theta:
            if settings.noise_mode == "dp":
                noise = dp_noise(group_sizes(theta.infos), key, settings, clip_norms, round_)
                sigmas, taus = noise.sigmas, noise.taus
            else:
                sigmas = noise_scales(theta, base, settings)
                taus = dict.fromkeys(sigmas, settings.jitter_tau)
        if uses_zbar(settings, sigmas):
            with files.read(files.center(round_, spec.clipping)) as center:
                write_zbar(center, key, round_, settings.copies_m, files, noise_device(spec.device))
    finally:
        if base:
            base.close()
    return sigmas, taus


def manual_per_layer_sigmas(values, groups: list[str]) -> dict[str, float]:
    """`sigma_per_layer` as a list (one per decoder layer; the global group takes their mean) or a dict."""
    layers = [g for g in groups if g != "global"]
    if isinstance(values, dict):
        missing = sorted(set(groups) - set(values))
        if missing:
            raise InvalidInput(f"sigma_per_layer has no value for {missing}: give one per group ({groups})")
        return {g: float(values[g]) for g in groups}
    if len(values) != len(layers):
        raise InvalidInput(f"sigma_per_layer has {len(values)} values; the model has {len(layers)} layers")
    sigmas = dict(zip(layers, map(float, values)))
    if "global" in groups:
        sigmas["global"] = sum(values) / len(values)
    return sigmas


def uses_zbar(settings: PumSettings, sigmas: dict[str, float]) -> bool:
    """Zero-sum noise needs z̄; a round without noise (every σ_ℓ = 0, e.g. κ = 0) has none to write."""
    return settings.noise_structure == "zero_sum" and any(s > 0 for s in sigmas.values())


def write_zbar(center: SafetensorsFile, key: bytes, round_: int, m: int, files: JobFiles, device: str = "cpu") -> None:
    """z̄ per tensor for the round, so publishing a copy regenerates only its own z_k."""
    tensors = (mean_base_noise(key, round_, m, i.name, i.shape, device) for i in center.infos)
    files.write_safetensors(files.zbar(round_), [TensorInfo(i.name, "F32", i.shape) for i in center.infos], tensors)


def copy_transform(files: JobFiles, key: bytes, settings: PumSettings, round_: int, k: int) -> CopyTransform | None:
    """T_k of the copy, when reparameterization is on (its secrets derive from the job key)."""
    if not settings.use_orthogonal_reparam:
        return None
    config = files.public_config()
    return CopyTransform(adapter_for(config), config, key, round_, k)


@functools.lru_cache(maxsize=64)
def round_alphas(key: bytes, round_: int, m: int, alpha_min: float, alpha_max: float) -> tuple[float, ...]:
    """α_1..α_m of a round, drawn once per process (m keyed hashes: milliseconds for a large m,
    and every download and merge of the round needs one of them)."""
    return tuple(draw_alphas(key, round_, m, alpha_min, alpha_max))


def copy_noise(key: bytes, settings: PumSettings, round_: int, k: int, device: str = "cpu") -> CopyNoise:
    alphas = round_alphas(key, round_, settings.copies_m, settings.alpha_min, settings.alpha_max)
    return CopyNoise(key, round_, k, settings.copies_m, alphas[k], settings.jitter_tau, settings.noise_structure,
                     noise_device(device))


def noise_device(device: str) -> str:
    """The job's noise device, if this server has it: the noise of a job is drawn on the device it
    was created with (another device type draws other numbers, and a resumed download must get the same bytes)."""
    if device != "cpu" and not torch.cuda.is_available():
        raise Conflict(f"this job draws its noise on {device}, and this server has no CUDA device: "
                       "run the server on a machine with one (the device is fixed per job)")
    return device


def published_layout(files: JobFiles, round_: int, dtypes: dict[str, str]) -> list[TensorInfo]:
    """Names, shapes and dtypes of a published copy: the model's own dtypes.

    A bf16 model is published in bf16: noise is drawn and added in float32, then rounded once.
    """
    with files.read(files.theta(round_)) as theta:
        return [TensorInfo(i.name, dtypes.get(i.name, "F32"), i.shape) for i in theta.infos]


@contextmanager
def copy_tensors(
    files: JobFiles, key: bytes, spec: JobSpec, round_: int, k: int, sigmas: dict[str, float], taus: dict[str, float],
) -> Iterator[Callable[[TensorInfo], torch.Tensor]]:
    """A function giving one tensor of copy k as published (T_k(θ̃ + α_k·σ_ℓ·ε_k + τ_ℓ·ξ_k) in the
    layout's dtype), generated from the seeds; the round's files stay open while it is in use."""
    settings = spec.settings
    noise = copy_noise(key, settings, round_, k, spec.device)
    transform = copy_transform(files, key, settings, round_, k)
    with files.read(files.center(round_, spec.clipping)) as center:
        zbar = files.read(files.zbar(round_)) if uses_zbar(settings, sigmas) else None
        try:
            def noisy(info: TensorInfo) -> torch.Tensor:
                z_mean = zbar.read(info.name) if zbar else None
                group = layer_group(info.name)
                tensor = noise.add_noise_inplace(info.name, center.read(info.name), sigmas[group], z_mean, taus[group])
                if transform is not None:
                    tensor = transform.forward(info.name, tensor)
                return tensor.to(DTYPES[info.dtype])

            yield noisy
        finally:
            if zbar:
                zbar.close()


def copy_chunks(
    files: JobFiles, key: bytes, spec: JobSpec, round_: int, k: int,
    sigmas: dict[str, float], taus: dict[str, float], layout: list[TensorInfo], start: int = 0,
) -> Iterator[bytes]:
    """The safetensors bytes of copy k from byte `start` on, generated tensor by tensor from the
    seeds: a resumed download regenerates exactly the same bytes."""
    with copy_tensors(files, key, spec, round_, k, sigmas, taus) as noisy:
        yield from stream_safetensors_from(layout, noisy, start)


def upload_layout(files: JobFiles, round_: int, dtypes: dict[str, str], kind: UploadKind) -> list[TensorInfo]:
    """What an upload of `kind` must contain: every tensor of the copy, as Δ' in float32 (`delta`) or
    bfloat16 (`delta-bf16`), or as the trained weights in the published copy's dtypes (`trained`)."""
    layout = published_layout(files, round_, dtypes)
    if kind is UploadKind.TRAINED:
        return layout
    return [TensorInfo(i.name, "BF16" if kind is UploadKind.DELTA_BF16 else "F32", i.shape) for i in layout]


@contextmanager
def received_update(
    files: JobFiles, key: bytes, spec: JobSpec, round_: int, k: int, trained: bool,
    sigmas: dict[str, float], taus: dict[str, float],
) -> Iterator[Callable[[TensorInfo, torch.Tensor], torch.Tensor]]:
    """A function giving Δ'_k of one tensor of copy k's upload, in float32, from the published
    tensor's info and the uploaded values (which it may change in place): the values themselves,
    or trained − copy_k with copy_k regenerated from the seeds exactly as published."""
    if not trained:
        yield lambda info, value: value.to(torch.float32)
        return
    with copy_tensors(files, key, spec, round_, k, sigmas, taus) as copy:
        yield lambda info, value: value.to(torch.float32).sub_(copy(info).to(torch.float32))


@dataclass(frozen=True)
class AcceptedUpload:
    k: int  # its copy
    name: str  # its blob in the job's files
    update_sums: dict[str, float] | None = None  # Σx² of Δ'_k per layer group, taken on receipt (None: not taken)


def accepted_updates(
    files: JobFiles, key: bytes, spec: JobSpec, round_: int, uploads: list[AcceptedUpload],
    sigmas: dict[str, float], taus: dict[str, float], stack: ExitStack,
) -> list[WeightedUpdate]:
    """Each accepted upload as w_k·clip(Δ_k), in the order given.

    Δ'_k is the upload itself (`delta`) or trained − copy_k with copy_k regenerated from the seeds
    exactly as published (`trained`), both in float32; Δ_k = T_k⁻¹(Δ'_k). The clipping norms are
    taken on Δ'_k (the transforms preserve every group's norm), on receipt (`update_sums`, kept in
    the store with the copy), so the step reads each upload once; an upload accepted without them
    is read once more here.
    """
    settings = spec.settings
    published = {i.name: i for i in published_layout(files, round_, spec.dtypes)}
    updates = []
    for accepted in uploads:
        k = accepted.k
        upload = stack.enter_context(files.read(accepted.name))
        trained = upload.metadata.get("kind") == UploadKind.TRAINED
        update = stack.enter_context(received_update(files, key, spec, round_, k, trained, sigmas, taus))
        transform = copy_transform(files, key, settings, round_, k)

        def raw(tensor: str, upload=upload, update=update) -> torch.Tensor:
            return update(published[tensor], upload.read(tensor))

        def aligned(tensor: str, raw=raw, transform=transform) -> torch.Tensor:
            return transform.inverse(tensor, raw(tensor)) if transform else raw(tensor)

        recorded = accepted.update_sums
        sums = (recorded if recorded is not None else group_sum_squares(list(published), raw)) \
            if settings.update_clipping_enabled else {}
        scales = update_clip_scales(sums, settings.clip_update_norm_per_layer, settings.clip_update_norm) if sums else {}
        updates.append(WeightedUpdate(harmonic_weight(copy_noise(key, settings, round_, k).alpha), aligned, scales))
    return updates


def model_sized_writes(files: JobFiles, spec: JobSpec, round_: int) -> int:
    """Disk the step of round r writes (θ_{r+1}, and θ_ref,r+1 with clipping), and at most what opening
    round r writes (z̄, and the clipped center with clipping): each blob the size of θ_r."""
    return files.size(files.theta(round_)) * (2 if spec.clipping else 1)


def step(files: JobFiles, key: bytes, spec: JobSpec, round_: int, uploads: list[AcceptedUpload],
         sigmas: dict[str, float], taus: dict[str, float]) -> None:
    """θ_{r+1} = θ_r + η·S1/S0 from the round's accepted uploads, reduced in
    the order given (by k); with clipping θ_ref,r+1 = β·θ_ref,r + (1 − β)·H_r, with
    H_r = Σ_k w_k·copy_k / S0 the harmonic combination of the round's published copies (before
    T_k): a released quantity, so the next round's sensitivity stays 2·C_ℓ given the past rounds.
    (The EMA of the secret center θ̃ would add (1 − β)·2·C_ℓ,r to every later round's sensitivity.)"""
    settings = spec.settings
    with ExitStack() as stack:
        updates = accepted_updates(files, key, spec, round_, uploads, sigmas, taus, stack)
        with files.read(files.theta(round_)) as theta, files.create(files.theta(round_ + 1)) as out:
            apply_merged(theta, updates, settings.eta_srv, out.file)
    if spec.clipping:
        alphas = list(round_alphas(key, round_, settings.copies_m, settings.alpha_min, settings.alpha_max))
        with files.read(files.theta_ref(round_)) as ref, files.read(files.clipped_center(round_)) as center, \
                files.create(files.theta_ref(round_ + 1)) as out:
            def released(info: TensorInfo) -> torch.Tensor:
                group = layer_group(info.name)
                noise = harmonic_noise(key, round_, alphas, info.name, info.shape, sigmas[group], taus[group],
                                       settings.noise_structure, noise_device(spec.device))
                return noise.add_(center.read(info.name).float())

            write_reference_ema(ref, released, settings.theta_ref_beta, out.file)
