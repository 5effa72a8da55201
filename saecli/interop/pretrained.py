"""`[sae] pretrained = "path"`: continue training a dictionary from a saecli, SAELens, sparsify or
dictionary_learning folder.

The trainer builds the dictionary the experiment describes and initialises it as usual (so the
dataset-wise scale is measured on this run's data); `start_from` then replaces its weights with the
pretrained ones, converted into this dictionary's units (the inverse of folding the scale), and checks on
probe inputs that the result computes what the folder computes. What cannot be carried over exactly is a
ConfigError naming the key to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saecli.errors import ConfigError
from saecli.interop.canonical import Canonical, from_dictionary, load_weights, skip_matrix
from saecli.interop.selfcheck import Reference, compare, metrics, reference_inputs, tolerance

if TYPE_CHECKING:
    from saecli.config.experiment import Experiment
    from saecli.dictionaries.base import Dictionary
    from saecli.dictionaries.sae import SparseAutoEncoder


def start_from(d: Dictionary, path: str | Path, key: str = "dictionary.pretrained") -> Canonical:
    """Load the dictionary at `path` into the freshly initialised `d` (same kind, widths and activation)."""
    from saecli.dictionaries.registry import load_dictionary
    from saecli.dictionaries.sae import SparseAutoEncoder

    if not Path(path).is_dir():
        raise ConfigError(f"pretrained dictionary folder not found: {path}", key=key)
    if not isinstance(d, SparseAutoEncoder):
        raise ConfigError(f"a {d.kind} cannot start from a pretrained folder yet (sae and transcoder can)", key=key)
    c = from_dictionary(load_dictionary(path).eval())
    _check(d, c, path, key)
    mode = d.cfg.norm_activation
    s_in = float(d.scale(d.in_hook)) if mode == "dataset-wise" else 1.0
    s_out = float(d.scale(d.out_hook)) if mode == "dataset-wise" else 1.0
    if d.cfg.decoder_unit_norm:  # rows of norm 1 in this dictionary's units (post_step keeps them so)
        try:
            c = c.unit_decoder(target=s_in / s_out)
        except ValueError as exc:
            raise ConfigError(
                f"{path}: {exc}; set dictionary.decoder_unit_norm = false to continue training it", key=key
            ) from None
        if d.cfg.activation == "batchtopk" and c.threshold is not None and not c.one_threshold():
            raise ConfigError(
                f"{path}: its decoder rows differ in norm, so with rows of norm 1 every latent needs its own "
                "threshold, and a BatchTopK dictionary holds one; set dictionary.decoder_unit_norm = false to "
                'continue training it (or dictionary.activation = "jumprelu", which holds one per latent)',
                key="dictionary.decoder_unit_norm",
            )
    load_weights(d, c, s_in, s_out)
    d.folded = False
    _verify(d, c, path)
    return c


def _check(d: SparseAutoEncoder, c: Canonical, path: str | Path, key: str) -> None:
    where = f"the pretrained dictionary ({path})"
    if c.kind != d.kind:
        raise ConfigError(f"{where} is a {c.kind}, the experiment trains a {d.kind}", key="dictionary.kind")
    if c.d_in != d.d_model:
        raise ConfigError(
            f"{where} reads width {c.d_in}, the hook point has d_model {d.d_model}", key="activations.hook_points"
        )
    if c.d_sae != d.d_sae:
        raise ConfigError(
            f"{where} has {c.d_sae} latents, the experiment {d.d_sae}: set dictionary.d_sae = {c.d_sae}",
            key="dictionary.d_sae",
        )
    act = d.cfg.activation
    # BatchTopK at inference is a JumpReLU with one threshold (SAELens saves it so): either way round
    ok = act == c.activation or (
        act == "batchtopk" and c.activation == "jumprelu" and (c.batchtopk or c.one_threshold())
    )
    if not ok:
        theirs = "batchtopk" if c.batchtopk else c.activation
        raise ConfigError(
            f'{where} uses {theirs}, the experiment {act}: set dictionary.activation = "{theirs}"',
            key="dictionary.activation",
        )
    for mine, theirs in ((d.in_hook, c.hook_in), (d.out_hook, c.hook_out)):
        if mine.startswith("blocks.") and theirs.startswith("blocks.") and mine != theirs:
            raise ConfigError(
                f"{where} was trained on {theirs}, the experiment reads {mine}",
                key="dictionary.hook_point" if d.kind == "sae" else "dictionary.hook_point_in",
            )
    want = "token-wise" if c.norm == "token-wise" else ("none", "dataset-wise")
    if d.cfg.norm_activation not in want:
        raise ConfigError(
            f"{where} scales its inputs {c.norm}, the experiment {d.cfg.norm_activation}",
            key="dictionary.norm_activation",
        )
    if c.W_skip is not None and skip_matrix(d) is None:
        raise ConfigError(
            f"{where} has a skip connection: set dictionary.skip_connection = true", key="dictionary.skip_connection"
        )
    if d.b_dec is None and bool(c.b_dec.abs().max() > 0):
        raise ConfigError(
            f"{where} has a decoder bias: set dictionary.use_decoder_bias = true", key="dictionary.use_decoder_bias"
        )
    if d.gated and c.activation == "topk":
        n = c.decoder_norms()
        if not torch.allclose(n, n.mean().expand_as(n), rtol=1e-3):
            raise ConfigError(
                f"{where} ranks its latents by h, this experiment by h·‖W_dec‖ (and its decoder rows "
                "differ in norm): set dictionary.sparsity_include_decoder_norm = false",
                key="dictionary.sparsity_include_decoder_norm",
            )


@torch.no_grad()
def _verify(d: SparseAutoEncoder, c: Canonical, path: str | Path) -> None:
    """The loaded dictionary reconstructs raw probe inputs as the pretrained folder does."""
    scale = float(d.d_model) ** 0.5 / (float(d.scale(d.in_hook)) if d.cfg.norm_activation == "dataset-wise" else 1.0)
    x = reference_inputs(c.W_enc, c.b_dec if c.kind == "sae" else None, scale)
    f_c, y_c = c(x)
    dev = d.W_enc.device
    y_d = d.reconstruct({d.in_hook: x.to(dev, d.W_enc.dtype)})[d.out_hook].float().cpu()
    f_d = d.encode(d.normalize({d.in_hook: x.to(dev, d.W_enc.dtype)})).float().cpu()
    # features may differ by a per-latent factor (decoder norms moved); compare which fire and the output
    ref = Reference(x, (f_c != 0).float(), y_c, metrics(x, f_c, y_c, c.kind == "sae"))
    compare(
        ref,
        (f_d != 0).float(),
        y_d,
        where=f"{path} loaded for training",
        tol=tolerance(d.W_enc.dtype),
        autoencoder=c.kind == "sae",
    )


__all__ = ["start_from"]


def or_pretrained(exp: Experiment, folder: Path) -> Path:
    """`folder` (a run's output folder), or the experiment's `[sae] pretrained` folder while `folder` holds
    no trained dictionary: an experiment that names a pretrained dictionary can be evaluated, analysed or
    given to DLA before (or without) training it further."""
    from saecli.dictionaries.base import WEIGHTS_NAME

    pretrained = exp.dictionary.pretrained if exp.dictionary is not None else None
    if pretrained and not (folder / WEIGHTS_NAME).exists():
        return Path(pretrained)
    return folder
