"""The numeric self-check: a small reference batch travels with every export and is replayed on load.

`reference.safetensors` (next to the weights, in every format) holds

    inputs            [n, d_in]   raw activations (directions the dictionary reads, at the data's scale)
    reconstruction    [n, d_out]  what saecli's own dictionary made of them (raw units)
    acts_values, acts_indices, acts_offsets   the latent activations, as CSR rows (n + 1 offsets)

and its safetensors metadata records `explained_variance` and `l0` as measured at save time. Loading
replays the batch through the loaded weights and compares: which latents fire (L0 and the firing
sets), their values, the reconstruction and its explained variance. Anything beyond tolerance raises
`SelfCheckError` naming the quantity — a transposed or mis-scaled matrix cannot load silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from saecli.errors import UsageError

REFERENCE_NAME = "reference.safetensors"
N_REFERENCE = 32


class SelfCheckError(UsageError):
    """A loaded dictionary does not reproduce the reference batch stored with it."""


@dataclass
class Reference:
    inputs: torch.Tensor
    acts: torch.Tensor  # dense [n, d_sae]
    reconstruction: torch.Tensor
    metrics: dict[str, float]


def reference_inputs(
    W_enc: torch.Tensor, b_dec: torch.Tensor | None, scale: float, n: int = N_REFERENCE, seed: int = 0
) -> torch.Tensor:
    """n inputs the dictionary responds to: sums of a few of its (unit) encoder directions plus noise,
    with norm `scale` (the data's typical norm), offset by `b_dec` for an SAE (the data's centre)."""
    g = torch.Generator().manual_seed(seed)
    d_sae, d_in = W_enc.shape
    idx = torch.randint(0, d_sae, (n, 4), generator=g)
    rows = W_enc[idx.reshape(-1)].float()  # only the rows used: W_enc may be gigabytes
    dirs = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(n, 4, d_in)
    coef = torch.rand(n, 4, generator=g) + 0.5
    x = (dirs * coef[..., None]).sum(1) + 0.3 * torch.randn(n, d_in, generator=g) / d_in**0.5
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale
    return x + (b_dec.float() if b_dec is not None and b_dec.shape[0] == d_in else 0.0)


def metrics(inputs: torch.Tensor, acts: torch.Tensor, recon: torch.Tensor, autoencoder: bool) -> dict[str, float]:
    out = {"l0": float((acts != 0).sum(-1).float().mean())}
    if autoencoder:  # explained variance of the input (a transcoder's target is not in the batch)
        var = (inputs - inputs.mean(0)).pow(2).sum()
        out["explained_variance"] = float(1 - (inputs - recon).pow(2).sum() / var.clamp_min(1e-30))
    return out


def save_reference(folder: Path, ref: Reference) -> None:
    from safetensors.torch import save_file

    from saecli.fsio import write_with

    acts = ref.acts.float()
    rows, cols = acts.nonzero(as_tuple=True)
    offsets = torch.zeros(acts.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(rows, minlength=acts.shape[0]).cumsum(0)
    tensors = {
        "inputs": ref.inputs.float().contiguous(),
        "reconstruction": ref.reconstruction.float().contiguous(),
        "acts_values": acts[rows, cols].contiguous(),
        "acts_indices": cols.contiguous(),
        "acts_offsets": offsets,
    }
    meta = {"saecli_reference": "1", "d_sae": str(ref.acts.shape[1]), "metrics": json.dumps(ref.metrics)}
    write_with(folder / REFERENCE_NAME, lambda p: save_file(tensors, str(p), metadata=meta))


def load_reference(folder: Path) -> Reference | None:
    from safetensors import safe_open

    path = folder / REFERENCE_NAME
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        n = t["inputs"].shape[0]
        rows = torch.repeat_interleave(torch.arange(n), t["acts_offsets"].diff())
        acts = torch.zeros(n, int(meta["d_sae"]))
        acts[rows, t["acts_indices"]] = t["acts_values"]
        return Reference(t["inputs"], acts, t["reconstruction"], json.loads(meta["metrics"]))
    except Exception as exc:  # noqa: BLE001 - any damage to the file is the same answer for the user
        raise SelfCheckError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}): the reference batch of the "
            "self-check is damaged; export the dictionary again"
        ) from None


def tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def compare(
    ref: Reference, acts: torch.Tensor, recon: torch.Tensor, *, where: str, tol: float, autoencoder: bool
) -> dict[str, float]:
    """Raise SelfCheckError naming the first quantity that differs from the reference; return the measured
    metrics. Order: shapes, L0, firing sets, activation values, reconstruction, explained variance."""
    hint = "(a weight matrix transposed, scaled or taken from another dictionary)"
    if acts.shape != ref.acts.shape:
        raise SelfCheckError(
            f"self-check failed for {where}: feature activations have shape {tuple(acts.shape)}, "
            f"the reference {tuple(ref.acts.shape)} {hint}"
        )
    if recon.shape != ref.reconstruction.shape:
        raise SelfCheckError(
            f"self-check failed for {where}: the reconstruction has shape {tuple(recon.shape)}, "
            f"the reference {tuple(ref.reconstruction.shape)} {hint}"
        )
    acts, recon = acts.float(), recon.float()
    got = metrics(ref.inputs, acts, recon, autoencoder)
    l0_ref = ref.metrics["l0"]
    if abs(got["l0"] - l0_ref) > max(0.5, 0.01 * l0_ref):
        raise SelfCheckError(f"self-check failed for {where}: L0 is {got['l0']:.2f}, {l0_ref:.2f} at save time {hint}")
    fired, fired_ref = acts != 0, ref.acts != 0
    flips = float((fired != fired_ref).sum()) / max(1.0, float(fired_ref.sum()))
    if flips > 0.01:
        raise SelfCheckError(
            f"self-check failed for {where}: {flips:.1%} of the firing latents differ from the reference {hint}"
        )
    both = fired & fired_ref
    scale = ref.acts.abs().max().clamp_min(1e-12)
    err = float((acts - ref.acts).abs()[both].max() / scale) if both.any() else 0.0
    if err > tol:
        raise SelfCheckError(
            f"self-check failed for {where}: feature activations differ from the reference by "
            f"{err:.2e} (relative; tolerance {tol:.0e}) {hint}"
        )
    r_err = float((recon - ref.reconstruction).norm() / ref.reconstruction.norm().clamp_min(1e-12))
    if r_err > tol * (1 + 10 * flips / 0.01):
        raise SelfCheckError(
            f"self-check failed for {where}: the reconstruction differs from the reference by "
            f"{r_err:.2e} (relative; tolerance {tol:.0e}) {hint}"
        )
    if autoencoder and "explained_variance" in ref.metrics:
        ev, ev_ref = got["explained_variance"], ref.metrics["explained_variance"]
        if abs(ev - ev_ref) > max(tol, 1e-3):
            raise SelfCheckError(
                f"self-check failed for {where}: explained variance is {ev:.4f}, {ev_ref:.4f} at save time {hint}"
            )
    return got
