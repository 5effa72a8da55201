"""Direct logit attribution: which output tokens each feature's decoder direction promotes or suppresses.

For a feature with decoder direction v (raw residual units), the logits it writes are

    logits(v) = [P(v) ⊙ γ] @ W_U

where the model's final norm is f(x) = P(x) ⊙ γ / s(x) + β with P = centring for LayerNorm (gpt2,
neox) and the identity for RMSNorm (llama, qwen, gemma — gemma's (1 + w) is its γ), and s(x) the
per-token normalising scalar (std or rms). "Through the final norm" therefore means: centre (LayerNorm
only), scale elementwise by γ, and treat the normalising division as 1 — it is one positive scalar per
token, the same for every vocabulary entry, so it changes no ranking — and drop β and any unembedding
bias (they do not depend on the feature). The values are the logit change per unit of feature
activation before the token's normalisation.

The norm is taken as the model applies it (`final_norm_and_unembed`), not re-implemented per family:
P(v) ⊙ γ = (f(v) − f(0)) · s(v), where f(0) = β, centring is detected from f(1) = β, and
s(v) = sqrt(mean(P(v)²) + eps) with the module's eps. W_U comes from the output embeddings, so tied and
untied embeddings are the same code.

A dictionary writing several out hooks (a CLT writing to every later layer) gets the sum of its
decoder directions over those hooks: what the feature adds to the residual stream in total. A kind
for which that sum is wrong (a crosscoder whose heads each reconstruct the whole residual) may define
`dla_directions(self) -> Tensor[d_sae, d_model]` (raw units) and it is used instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saecli.errors import UsageError
from saecli.fsio import write_json

if TYPE_CHECKING:
    from saecli.dictionaries.base import Dictionary
    from saecli.lm.loading import LanguageModel


DLA_FILE = "dla.json"


@torch.no_grad()
def feature_directions(dictionary: Dictionary) -> torch.Tensor:
    """[d_sae, d_model] raw-unit directions each feature writes (summed over out hooks)."""
    own = dictionary.dla_directions()
    if own is not None:
        return own.detach()
    mode = dictionary.cfg.norm_activation
    total = None
    for hook in dictionary.out_hooks:
        d = dictionary.decoder_directions(hook).detach()
        if not dictionary.folded and mode == "dataset-wise":
            d = dictionary.denormalize(hook, d)  # normalised units → raw units (÷ the hook's scale)
        total = d if total is None else total + d
    if total is None:
        raise UsageError("the dictionary writes to no hook point, so it has no decoder direction")
    return total


def _eps(norm: Any) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


class NormAsLinear:
    """The final norm applied to directions with its normalising scalar set to 1 and its bias dropped."""

    def __init__(self, norm: Callable[[torch.Tensor], torch.Tensor], d_model: int, device: torch.device):
        if isinstance(norm, torch.nn.Module):
            norm = copy.deepcopy(norm).to(device=device, dtype=torch.float32)
        self.norm = norm
        self.eps = _eps(norm)
        zeros = torch.zeros(1, d_model, device=device)
        ones = torch.ones(1, d_model, device=device)
        self.bias = norm(zeros).float()
        at_ones = norm(ones).float() - self.bias
        self.centred = bool(at_ones.abs().max() <= 1e-6 * (1 + self.bias.abs().max()))

    @property
    def kind(self) -> str:
        return "layernorm (centre, × weight)" if self.centred else "rmsnorm (× weight)"

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = v.float()
        p = v - v.mean(-1, keepdim=True) if self.centred else v
        s = (p.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return (self.norm(v).float() - self.bias) * s


@dataclass
class DLAResult:
    """Top positive/negative tokens per feature: ids and logits are [d_sae, top]."""

    pos_ids: np.ndarray
    pos_logits: np.ndarray
    neg_ids: np.ndarray
    neg_logits: np.ndarray
    vocab: dict[int, str]
    meta: dict

    @property
    def d_sae(self) -> int:
        return int(self.pos_ids.shape[0])

    def feature(self, index: int) -> dict:
        """{"top_positive": [{token, id, logit}], "top_negative": [...]} (most negative first)."""

        def items(ids: np.ndarray, logits: np.ndarray) -> list[dict]:
            return [
                {"token": self.vocab.get(int(t), str(int(t))), "id": int(t), "logit": float(v)}
                for t, v in zip(ids[index], logits[index])
            ]

        return {
            "top_positive": items(self.pos_ids, self.pos_logits),
            "top_negative": items(self.neg_ids, self.neg_logits),
        }

    def items(self) -> Iterator[tuple[int, dict]]:
        for i in range(self.d_sae):
            yield i, self.feature(i)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / DLA_FILE
        write_json(
            path,
            {
                **self.meta,
                "vocab": {str(k): v for k, v in sorted(self.vocab.items())},
                "positive": {"ids": self.pos_ids.tolist(), "logits": np.round(self.pos_logits, 5).tolist()},
                "negative": {"ids": self.neg_ids.tolist(), "logits": np.round(self.neg_logits, 5).tolist()},
            },
            indent=None,
        )
        return path

    @classmethod
    def load(cls, folder: str | Path) -> DLAResult | None:
        import json

        path = Path(folder) / DLA_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        arr = lambda key, part, dt: np.asarray(data[key][part], dtype=dt).reshape(len(data[key][part]), -1)  # noqa: E731
        meta = {k: v for k, v in data.items() if k not in ("vocab", "positive", "negative")}
        return cls(
            arr("positive", "ids", np.int64),
            arr("positive", "logits", np.float32),
            arr("negative", "ids", np.int64),
            arr("negative", "logits", np.float32),
            {int(k): v for k, v in data["vocab"].items()},
            meta,
        )


@torch.no_grad()
def direct_logit_attribution(
    directions: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor] | NormAsLinear,
    W_U: torch.Tensor,
    top: int = 10,
    *,
    chunk_elements: int = 1 << 24,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """(pos_logits, pos_ids, neg_logits, neg_ids), each [d_sae, top]; neg sorted most negative first.

    `directions` [d_sae, d_model] raw units; `norm` the model's final norm module; `W_U` [d_model, vocab].
    Rows are processed in chunks so that a chunk's logits hold at most `chunk_elements` floats.
    """
    device = W_U.device
    d_sae, d_model = directions.shape
    vocab = W_U.shape[1]
    top = min(top, vocab)
    lin = norm if isinstance(norm, NormAsLinear) else NormAsLinear(norm, d_model, device)
    W = W_U.to(torch.float32)
    rows = max(1, chunk_elements // vocab)
    out = [
        torch.empty(d_sae, top, device=device, dtype=dt)
        for dt in (torch.float32, torch.int64, torch.float32, torch.int64)
    ]
    for start in range(0, d_sae, rows):
        stop = min(start + rows, d_sae)
        logits = lin(directions[start:stop].to(device)) @ W
        pos = logits.topk(top, dim=1)
        neg = logits.topk(top, dim=1, largest=False)
        out[0][start:stop], out[1][start:stop] = pos.values, pos.indices
        out[2][start:stop], out[3][start:stop] = neg.values, neg.indices
        if progress is not None:
            progress(stop - start)
    return tuple(out)


def dla_result(
    dictionary: Dictionary, lm: LanguageModel, top: int = 10, progress: Callable[[int], None] | None = None
) -> DLAResult:
    """DLA of every feature of `dictionary` through `lm`'s final norm and unembedding."""
    from saecli.analysis.analyzer import decoder_for
    from saecli.lm import final_norm_and_unembed

    norm, W_U = final_norm_and_unembed(lm)
    from saecli.lm.hooks import residual_directions

    dirs = residual_directions(lm, list(dictionary.out_hooks), feature_directions(dictionary))  # attn.hook_z: × W_O
    if dirs.shape[1] != W_U.shape[0]:
        raise UsageError(
            f"the dictionary's directions have {dirs.shape[1]} dimensions but {lm.name}'s "
            f"residual stream has {W_U.shape[0]}: is it the dictionary of another model?"
        )
    lin = NormAsLinear(norm, W_U.shape[0], W_U.device)
    pos_v, pos_i, neg_v, neg_i = direct_logit_attribution(dirs, lin, W_U, top, progress=progress)
    ids = torch.unique(torch.cat([pos_i.reshape(-1), neg_i.reshape(-1)])).tolist()
    vocab = dict(zip(ids, decoder_for(lm.tokenizer)(ids))) if lm.tokenizer is not None else {}
    meta = {
        "model": lm.name,
        "top": int(pos_i.shape[1]),
        "norm": lin.kind,
        "out_hooks": list(dictionary.out_hooks),
        "biases": "ignored (final-norm bias, unembedding bias)",
    }
    return DLAResult(pos_i.cpu().numpy(), pos_v.cpu().numpy(), neg_i.cpu().numpy(), neg_v.cpu().numpy(), vocab, meta)
