"""One round on disk: noise scales, z̄, published copies, merging uploads, the step.

Files of a job (under state_dir/jobs/<id>/):
    secret.key                      job key (0600): α_k, seeds and z̄ derive from it
    theta_r{r}.safetensors          θ at the start of round r (float32)
    base.safetensors                the public base model θ_base, when one is given
    rounds/r{r}/theta_ref.safetensors  θ_ref of round r (center clipping only)
    rounds/r{r}/center.safetensors  the clipped center θ̃ of round r (0600; center clipping only)
    rounds/r{r}/zbar.safetensors    z̄ of the round's zero-sum noise (0600, secret)
    rounds/r{r}/s1_{n}.safetensors  S1 after n accepted copies
    spool/<lease>.safetensors       an upload being received
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from pum.common.aggregate import accumulate_delta, apply_update, harmonic_weight, sum_of_squares
from pum.common.center import write_center, write_reference_ema
from pum.common.codec import DTYPES, SafetensorsFile, TensorInfo, save_file_atomic, stream_safetensors_from
from pum.common.errors import InvalidInput
from pum.common.layers import group_names, layer_group
from pum.common.noise import CopyNoise, draw_alphas, harmonic_noise, mean_base_noise, relative_sigmas
from pum.common.reparam import CopyTransform, adapter_for
from pum.common.privacy.target import RoundNoise, calibrate_round
from pum.common.settings import PumSettings


@dataclass(frozen=True)
class JobFiles:
    root: Path

    @property
    def key(self) -> Path:
        return self.root / "secret.key"

    @property
    def public(self) -> Path:
        return self.root / "public"

    def theta(self, round_: int) -> Path:
        return self.root / f"theta_r{round_}.safetensors"

    def round_dir(self, round_: int) -> Path:
        return self.root / "rounds" / f"r{round_}"

    @property
    def base(self) -> Path:
        return self.root / "base.safetensors"

    def theta_ref(self, round_: int) -> Path:
        return self.round_dir(round_) / "theta_ref.safetensors"

    def center(self, round_: int) -> Path:
        """θ̃ of the round: the clipped center when clipping is on, else θ itself."""
        clipped = self.round_dir(round_) / "center.safetensors"
        return clipped if clipped.exists() else self.theta(round_)

    def zbar(self, round_: int) -> Path:
        return self.round_dir(round_) / "zbar.safetensors"

    def s1(self, round_: int, accepted: int) -> Path:
        return self.round_dir(round_) / f"s1_{accepted}.safetensors"

    def spool(self, lease_id: str) -> Path:
        return self.root / "spool" / f"{lease_id}.safetensors"


def write_secret(path: Path, data: bytes) -> None:
    """Create a file only the server's user can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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
    alphas = draw_alphas(key, round_, settings.copies_m, settings.alpha_min, settings.alpha_max)
    return calibrate_round(settings, sizes, clips, alphas)


def round_noise(rnd, settings: PumSettings) -> tuple[dict[str, float], dict[str, float]]:
    """(σ_ℓ, τ_ℓ) of a stored round; a round stored before τ_ℓ was kept used jitter_tau everywhere."""
    return rnd.sigmas, rnd.taus or dict.fromkeys(rnd.sigmas, settings.jitter_tau)


def clip_thresholds_for_round(clip_norms: dict[str, float | None], settings: PumSettings, round_: int) -> dict[str, float | None]:
    """C_ℓ·γ^(r−1): the thresholds grow by γ each round from round 2 (DESIGN.md §4)."""
    growth = settings.center_clip_round_gamma ** (round_ - 1)
    return {g: (c * growth if c is not None else None) for g, c in clip_norms.items()}


def prepare_round(
    files: JobFiles, key: bytes, settings: PumSettings, clip_norms: dict[str, float | None] | None, round_: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Write the round's center (when clipping) and z̄; returns (σ_ℓ, τ_ℓ). Idempotent: a crash redoes it."""
    files.round_dir(round_).mkdir(parents=True, exist_ok=True)
    if clip_norms is not None:
        clipped = files.round_dir(round_) / "center.safetensors"
        with SafetensorsFile(files.theta(round_)) as theta, SafetensorsFile(files.theta_ref(round_)) as ref:
            write_center(theta, ref, clip_thresholds_for_round(clip_norms, settings, round_), clipped)
    base = SafetensorsFile(files.base) if files.base.exists() else None
    try:
        with SafetensorsFile(files.theta(round_)) as theta:
            if settings.noise_mode == "dp":
                noise = dp_noise(group_sizes(theta.infos), key, settings, clip_norms, round_)
                sigmas, taus = noise.sigmas, noise.taus
            else:
                sigmas = noise_scales(theta, base, settings)
                taus = dict.fromkeys(sigmas, settings.jitter_tau)
        if uses_zbar(settings, sigmas):
            with SafetensorsFile(files.center(round_)) as center:
                write_zbar(center, key, round_, settings.copies_m, files.zbar(round_))
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


def write_zbar(theta: SafetensorsFile, key: bytes, round_: int, m: int, path: Path) -> None:
    """z̄ per tensor for the round, so publishing a copy regenerates only its own z_k."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = (mean_base_noise(key, round_, m, i.name, i.shape) for i in theta.infos)
    save_file_atomic(path, [TensorInfo(i.name, "F32", i.shape) for i in theta.infos], tensors, private=True)


def copy_transform(files: JobFiles, key: bytes, settings: PumSettings, round_: int, k: int) -> CopyTransform | None:
    """T_k of the copy, when reparameterization is on (its secrets derive from the job key)."""
    if not settings.use_orthogonal_reparam:
        return None
    config = json.loads((files.public / "config.json").read_text())
    return CopyTransform(adapter_for(config), config, key, round_, k)


def copy_noise(key: bytes, settings: PumSettings, round_: int, k: int) -> CopyNoise:
    alphas = draw_alphas(key, round_, settings.copies_m, settings.alpha_min, settings.alpha_max)
    return CopyNoise(key, round_, k, settings.copies_m, alphas[k], settings.jitter_tau, settings.noise_structure)


def published_layout(theta_path: Path, dtypes: dict[str, str]) -> list[TensorInfo]:
    """Names, shapes and dtypes of a published copy: the model's own dtypes.

    A bf16 model is published in bf16: noise is drawn and added in float32, then rounded once.
    """
    with SafetensorsFile(theta_path) as theta:
        return [TensorInfo(i.name, dtypes.get(i.name, "F32"), i.shape) for i in theta.infos]


@contextmanager
def copy_tensors(
    files: JobFiles, key: bytes, settings: PumSettings, round_: int, k: int,
    sigmas: dict[str, float], taus: dict[str, float],
) -> Iterator[Callable[[TensorInfo], torch.Tensor]]:
    """A function giving one tensor of copy k as published (T_k(θ̃ + α_k·σ_ℓ·ε_k + τ_ℓ·ξ_k) in the
    layout's dtype), generated from the seeds; the round's files stay open while it is in use."""
    noise = copy_noise(key, settings, round_, k)
    transform = copy_transform(files, key, settings, round_, k)
    with SafetensorsFile(files.center(round_)) as center:
        zbar = SafetensorsFile(files.zbar(round_)) if uses_zbar(settings, sigmas) else None
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
    files: JobFiles, key: bytes, settings: PumSettings, round_: int, k: int,
    sigmas: dict[str, float], taus: dict[str, float], layout: list[TensorInfo], start: int = 0,
) -> Iterator[bytes]:
    """The safetensors bytes of copy k from byte `start` on, generated tensor by tensor from the
    seeds: a resumed download regenerates exactly the same bytes."""
    with copy_tensors(files, key, settings, round_, k, sigmas, taus) as noisy:
        yield from stream_safetensors_from(layout, noisy, start)


def merge_spooled(
    files: JobFiles, key: bytes, settings: PumSettings, round_: int, k: int,
    spool: Path, s0: float, accepted: int,
) -> tuple[float, Path]:
    """Fold one spooled delta into S1; returns the new S0 and the new S1 file (not yet committed)."""
    alpha = copy_noise(key, settings, round_, k).alpha
    weight = harmonic_weight(alpha)
    transform = copy_transform(files, key, settings, round_, k)
    previous = files.s1(round_, accepted) if accepted else None
    out = files.s1(round_, accepted + 1)
    with SafetensorsFile(spool) as delta:
        s1_previous = SafetensorsFile(previous) if previous else None
        try:
            accumulate_delta(
                delta, s1_previous, out, weight, align=transform.inverse if transform else None,
                clip_per_layer=settings.clip_update_norm_per_layer, clip_total=settings.clip_update_norm,
            )
        finally:
            if s1_previous:
                s1_previous.close()
    return s0 + weight, out


def step(files: JobFiles, key: bytes, settings: PumSettings, round_: int, s0: float, s1_path: Path,
         sigmas: dict[str, float], taus: dict[str, float]) -> Path:
    """θ_{r+1} = θ_r + η·S1/S0, and with clipping θ_ref,r+1 = β·θ_ref,r + (1 − β)·H_r, with
    H_r = Σ_k w_k·copy_k / S0 the harmonic combination of the round's published copies (before
    T_k): a released quantity, so the next round's sensitivity stays 2·C_ℓ given the past rounds.
    (The EMA of the secret center θ̃ would add (1 − β)·2·C_ℓ,r to every later round's sensitivity.)"""
    out = files.theta(round_ + 1)
    with SafetensorsFile(files.theta(round_)) as theta, SafetensorsFile(s1_path) as s1:
        apply_update(theta, s1, s0, settings.eta_srv, out)
    if files.theta_ref(round_).exists():
        files.round_dir(round_ + 1).mkdir(parents=True, exist_ok=True)
        alphas = draw_alphas(key, round_, settings.copies_m, settings.alpha_min, settings.alpha_max)
        with SafetensorsFile(files.theta_ref(round_)) as ref, SafetensorsFile(files.center(round_)) as center:
            def released(info: TensorInfo) -> torch.Tensor:
                group = layer_group(info.name)
                noise = harmonic_noise(key, round_, alphas, info.name, info.shape, sigmas[group], taus[group],
                                       settings.noise_structure)
                return noise.add_(center.read(info.name).float())

            write_reference_ema(ref, released, settings.theta_ref_beta, files.theta_ref(round_ + 1))
    return out
