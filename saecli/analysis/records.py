"""The result of a feature analysis: arrays for all features at once, per-feature records, one file.

On disk an analysis is ONE file, `<dictionary>/analysis/<name>/features.safetensors`, holding every
array plus the metadata (JSON in the safetensors header), written atomically: a reader sees the
previous analysis or the new one, never a mix. `meta.json` beside it is a readable copy of the
metadata, written afterwards (the safetensors file is the source of truth).

Arrays (F = d_sae, n = samples kept, T = context size):
  act_times [F] int64, max_act [F] float32, hist_counts [F, bins] int64, hist_edges [bins + 1] float64,
  sampling.<name>.{count [F], value [F, n] float32, tokens [F, n, T] int32, acts [F, n, T] float16,
  doc [F, n] int64, pos [F, n] int64}, extra.<name> [F, ...].
`meta["vocab"]` maps every token id that occurs in a kept context to its text, so the dashboard and
`--show` need no tokenizer.

A feature record (what the store holds per feature, see `feature()`):
  {index, act_times, n_analyzed_tokens, density, max_act, histogram: {edges, counts},
   samplings: [{name, tokens [k, T] int32, acts [k, T] float16, max [k], doc [k], pos [k]}], <extras>}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saecli.errors import UsageError
from saecli.fsio import write_json, write_with

FEATURES_FILE = "features.safetensors"
META_FILE = "meta.json"
SAMPLING_FIELDS = ("count", "value", "tokens", "acts", "doc", "pos")


def analysis_dir(sae_folder: str | Path, name: str) -> Path:
    return Path(sae_folder) / "analysis" / name


@dataclass
class AnalysisResult:
    name: str
    n_analyzed_tokens: int
    act_times: np.ndarray
    max_act: np.ndarray
    hist_counts: np.ndarray
    hist_edges: np.ndarray
    samplings: dict[str, dict[str, np.ndarray]]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.act_times.shape[0])

    @property
    def vocab(self) -> dict[int, str]:
        return {int(k): v for k, v in self.meta.get("vocab", {}).items()}

    def density(self) -> np.ndarray:
        """[F] fraction of analysed tokens on which each feature fired."""
        return self.act_times / max(self.n_analyzed_tokens, 1)

    def feature(self, index: int) -> dict:
        """The record of one feature (only filled sampling slots, best first)."""
        i = int(index)
        if not 0 <= i < self.d_sae:
            raise UsageError(
                f"feature {index} does not exist: the dictionary has {self.d_sae} features (0–{self.d_sae - 1})"
            )
        samplings = []
        for name, s in self.samplings.items():
            k = int(s["count"][i])
            samplings.append(
                {
                    "name": name,
                    "tokens": s["tokens"][i, :k].astype(np.int32),
                    "acts": s["acts"][i, :k].astype(np.float16),
                    "max": s["value"][i, :k].astype(np.float32),
                    "doc": s["doc"][i, :k].astype(np.int64),
                    "pos": s["pos"][i, :k].astype(np.int64),
                }
            )
        record = {
            "index": i,
            "act_times": int(self.act_times[i]),
            "n_analyzed_tokens": int(self.n_analyzed_tokens),
            "density": float(self.act_times[i]) / max(self.n_analyzed_tokens, 1),
            "max_act": float(self.max_act[i]),
            "histogram": {"edges": self.hist_edges.astype(np.float32), "counts": self.hist_counts[i].astype(np.int64)},
            "samplings": samplings,
        }
        for name, arr in self.extras.items():
            value = arr[i]
            record[name] = value.item() if np.ndim(value) == 0 else np.asarray(value)
        return record

    def records(self) -> Iterator[dict]:
        for i in range(self.d_sae):
            yield self.feature(i)

    def store_meta(self) -> dict:
        """Metadata for the store (the vocab table stays in the file)."""
        meta = {k: v for k, v in self.meta.items() if k != "vocab"}
        meta.update(
            n_analyzed_tokens=int(self.n_analyzed_tokens),
            n_features=self.d_sae,
            n_fired=int((self.act_times > 0).sum()),
        )
        return meta

    # ------------------------------------------------------------------ file
    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "act_times": self.act_times.astype(np.int64),
            "max_act": self.max_act.astype(np.float32),
            "hist_counts": self.hist_counts.astype(np.int64),
            "hist_edges": self.hist_edges.astype(np.float64),
        }
        for name, s in self.samplings.items():
            for key in SAMPLING_FIELDS:
                out[f"sampling.{name}.{key}"] = s[key]
        for name, arr in self.extras.items():
            out[f"extra.{name}"] = np.asarray(arr)
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    def save(self, folder: str | Path) -> Path:
        """Write `folder/features.safetensors` atomically (then `meta.json`); returns the file path."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        header = {
            "name": self.name,
            "n_analyzed_tokens": int(self.n_analyzed_tokens),
            "samplings": list(self.samplings),
            "meta": self.meta,
        }
        path = folder / FEATURES_FILE
        arrays = self.arrays()
        write_with(path, lambda p: save_file(arrays, str(p), metadata={"saecli_analysis": json.dumps(header)}))
        summary = {k: v for k, v in header.items() if k != "meta"}
        summary.update({k: v for k, v in self.meta.items() if k != "vocab"})
        summary["file"] = FEATURES_FILE
        write_json(folder / META_FILE, summary)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AnalysisResult:
        from safetensors import safe_open

        path = Path(folder) / FEATURES_FILE
        if not path.exists():
            raise UsageError(f"no analysis at {path.parent}: run `saecli analyze` first")
        with safe_open(str(path), framework="numpy") as fh:
            header = json.loads((fh.metadata() or {})["saecli_analysis"])
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        samplings: dict[str, dict[str, np.ndarray]] = {name: {} for name in header["samplings"]}
        extras: dict[str, np.ndarray] = {}
        for key, arr in arrays.items():
            if key.startswith("sampling."):
                name, fld = key[len("sampling.") :].rsplit(".", 1)
                samplings[name][fld] = arr
            elif key.startswith("extra."):
                extras[key[len("extra.") :]] = arr
        return cls(
            name=header["name"],
            n_analyzed_tokens=int(header["n_analyzed_tokens"]),
            act_times=arrays["act_times"],
            max_act=arrays["max_act"],
            hist_counts=arrays["hist_counts"],
            hist_edges=arrays["hist_edges"],
            samplings=samplings,
            extras=extras,
            meta=header.get("meta", {}),
        )
