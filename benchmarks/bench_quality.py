"""Dictionary quality side by side (shared/PERFORMANCE.md, "Dictionary quality"): saecli's defaults vs peers.

Protocol: one activation cache written by `saecli generate` (SmolLM2-135M, layer 12 residual stream,
experiments/smollm2/quality.toml) and a second one of the documents after it (held out). saecli trains
with its defaults (`saecli train` on the file: model, hook, d_sae, k and the token budget set, nothing
else); each peer is fed the very same batches in the same order (saecli's seeded cache stream), for the
same number of steps. Every dictionary is then turned into encode/decode callables and scored by ONE
scorer on the held-out tokens:

- EV = 1 − Σ‖x̂ − x‖² / Σ‖x − x̄‖² (saecli.evaluation.metrics.ReconstructionStats) over every held-out
  token, and over the *typical* ones: norm below the 99th percentile (the rare huge-norm tokens carry a
  large share of the variance and hide the rest);
- L0 (mean non-zero codes per token), dead % (latents that never fire on the held-out tokens);
- CE loss recovered, spliced at the hook on held-out contexts (positions the cache leaves out, e.g.
  BOS, keep their activation): (CE_abl − CE_spliced) / (CE_abl − CE_clean) with the ablation replacing
  the activation by zeros, and by the mean held-out activation;
- train tokens/s: wall time of each library's training loop (reading the cached batches included).

Peers run as their READMEs say and again with their fixed step/token windows cut to the run (1 % of
the steps for warm-ups, 10 % of the tokens for dead windows: saecli's own fractions).

    ./scripts/get_smollm2.sh
    flock /tmp/saecli-bench.lock nice -n 10 python benchmarks/bench_quality.py --quick          # ≈ 5 min
    flock /tmp/saecli-bench.lock nice -n 10 python benchmarks/bench_quality.py --tokens 300000  # ≈ 30 min
    python benchmarks/bench_quality.py --tokens 300000 --saecli-row 'trainer.lr=2e-3'  # + a saecli row
    python benchmarks/bench_quality.py --tokens 300000 --saecli-row 'dictionary.matryoshka_prefixes=[256, 1024]'
    python benchmarks/bench_quality.py --tokens 300000 --hook blocks.6.hook_resid_post   # a second layer

Skip transcoders (MLP input → MLP output; quality-transcoder.toml, the same cache): the same table, EV
and typical tokens on the MLP's output, CE with the MLP's output replaced by the transcoder's (from the
MLP's input of the same forward), against sparsify's skip transcoder:

    python benchmarks/bench_quality.py --config experiments/smollm2/quality-transcoder.toml --tokens 300000

A missing peer is a skipped row (`pip install '.[bench]'` installs them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_peers import Budget, Coder, PeerMissing, cut_steps, cut_tokens, train_dictionary_learning, train_sparsify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "experiments" / "smollm2" / "quality.toml"
PEERS = ("sparsify", "sparsify-adam-cut", "dictionary_learning", "dictionary_learning-cut")
TYPICAL_QUANTILE = 0.99


# ------------------------------------------------------------------------------------------------- data
def load(config: Path, overrides: list[str]) -> Any:
    from saecli.config.load import load_experiment

    return load_experiment(config, overrides)


def caches(config: Path, tokens: int, eval_tokens: int, root: Path) -> tuple[list[str], int]:
    """Write (once) the training cache of `tokens` and the held-out cache of the documents after it.

    Returns the overrides pointing an experiment at them, and the first held-out document."""
    from saecli.data.manifest import open_cache
    from saecli.data.open import cache_exists

    train_dir, eval_dir = root / f"train-{tokens}", root / f"heldout-{tokens}-{eval_tokens}"
    train = [f"activations.cache_dir='{train_dir}'", f"activations.total_tokens={tokens}"]
    if not cache_exists(train_dir):
        _generate(config, train)
    first_heldout = int(open_cache(train_dir).documents_consumed)
    held = [
        f"activations.cache_dir='{eval_dir}'",
        f"activations.total_tokens={eval_tokens}",
        f"dataset.skip_documents={first_heldout}",
    ]
    if not cache_exists(eval_dir):
        _generate(config, held)
    return train + [f"eval.cache_dir='{eval_dir}'"], first_heldout


def _generate(config: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "saecli", "generate", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env)


def io_hooks(exp: Any) -> tuple[str, str]:
    """(hook read, hook reconstructed): the same hook for an SAE, the MLP's input and output for a transcoder."""
    if exp.dictionary.kind == "transcoder":
        hooks = exp.activations.hook_points
        return exp.dictionary.hook_point_in or hooks[0], exp.dictionary.hook_point_out or hooks[1]
    return exp.activations.hook_points[0], exp.activations.hook_points[0]


def train_batches(exp: Any) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training stream saecli's own `train` opens for `exp` (same seed: same batches, same order):
    activations, or (input, target) pairs for a transcoder."""
    from saecli.data.open import open_stream

    hook_in, hook_out = io_hooks(exp)
    for batch in open_stream(exp, purpose="train"):
        x = batch.acts[hook_in].float()
        yield x if hook_in == hook_out else (x, batch.acts[hook_out].float())


def heldout_activations(exp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of the held-out cache, in order: (inputs, targets) [M, d] float32 (one tensor for an SAE)."""
    from saecli.data.reader import CacheStream

    hook_in, hook_out = io_hooks(exp)
    hooks = sorted({hook_in, hook_out})
    stream = CacheStream(
        exp.eval.cache_dir, hook_points=hooks, batch_size=exp.activations.batch_size, shuffle=False, epochs=1
    )
    batches = [(b.acts[hook_in].float(), b.acts[hook_out].float()) for b in stream]
    x = torch.cat([b[0] for b in batches])
    return x, (x if hook_in == hook_out else torch.cat([b[1] for b in batches]))


def ce_contexts(exp: Any, lm: Any, first_document: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` packed windows of held-out text (from `first_document`), in model batches of (tokens, mask)."""
    from saecli.data.text import iter_documents
    from saecli.data.tokens import packer_for

    dataset = dataclasses.replace(exp.dataset, skip_documents=first_document)
    out, left = [], n
    for ctx in packer_for(lm, exp.activations, exp.model).contexts(
        iter_documents(dataset), exp.activations.model_batch_size
    ):
        if left <= 0:
            break
        out.append((ctx.tokens[:left], ctx.mask[:left]))
        left -= int(out[-1][0].shape[0])
    return out


# ----------------------------------------------------------------------------------------------- scoring
def reconstruction_scores(
    coder: Coder, x: torch.Tensor, y: torch.Tensor, typical: torch.Tensor, chunk: int = 4096
) -> dict:
    """EV (all / typical tokens) of reconstructing `y` from `x` (the same tensor for an SAE), L0 and dead %
    of one coder on held-out activations [M, d]."""
    from saecli.evaluation.metrics import ReconstructionStats

    every, usual = ReconstructionStats(), ReconstructionStats()
    fired: torch.Tensor | None = None
    nonzero = 0
    for start in range(0, x.shape[0], chunk):
        xs, ys, keep = x[start : start + chunk], y[start : start + chunk], typical[start : start + chunk]
        codes = coder.encode(xs)
        y_hat = coder.reconstruct(codes, xs)
        every.update(ys, y_hat)
        usual.update(ys[keep], y_hat[keep])
        active = codes != 0
        nonzero += int(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
    assert fired is not None
    return {
        "ev": every.result()["explained_variance"],
        "ev_typical": usual.result()["explained_variance"],
        "l0": nonzero / x.shape[0],
        "dead_pct": 100.0 * float((~fired).float().mean()),
    }


def typical_mask(x: torch.Tensor, quantile: float = TYPICAL_QUANTILE) -> torch.Tensor:
    """Tokens whose norm is below the `quantile` of the held-out norms."""
    norms = x.norm(dim=-1)
    return norms < torch.quantile(norms, quantile)


@torch.no_grad()
def ce_scores(
    lm: Any,
    hooks: tuple[str, str],
    contexts: list[tuple[torch.Tensor, torch.Tensor]],
    coders: list[Coder],
    mean: torch.Tensor,
) -> dict[str, dict[str, float]]:
    """CE recovered by every coder against zero- and mean-ablation, sharing the clean/ablated forwards.

    `hooks` (read, replaced): a transcoder's output replaces the MLP's from the MLP's input of the same
    forward. Counted predictions follow saecli.evaluation.splice (`counted_predictions`); positions outside
    the mask keep their activation in every spliced/ablated forward."""
    from saecli.evaluation.splice import counted_predictions
    from saecli.lm import forward_with_replacements

    sums: dict[str, float] = {}
    n_pred = 0
    hook_in, hook_out = hooks
    for tokens, mask in contexts:
        counted = counted_predictions(mask)
        targets = tokens[:, 1:]
        n_pred += int(counted.sum())
        captured: dict[str, torch.Tensor] = {}

        def record(act: torch.Tensor) -> None:
            captured["x"] = act  # noqa: B023 (called within this iteration only)

        def nll(replace: Callable[[torch.Tensor], torch.Tensor] | None) -> float:
            fns: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {hook_in: record}  # noqa: B023
            if replace is not None:
                fns[hook_out] = replace  # after hook_in in the forward, so captured["x"] is this forward's
            logits = forward_with_replacements(lm, tokens, fns)  # noqa: B023
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            return float(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[counted].sum(dtype=torch.float64))  # noqa: B023

        def splice(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(act: torch.Tensor) -> torch.Tensor:
                new = act.clone()
                src = act if hook_in == hook_out else captured["x"]  # noqa: B023
                new[mask] = make(src[mask].float()).to(act.dtype)  # noqa: B023
                return new

            return fn

        parts = {
            "clean": nll(None),
            "zero": nll(splice(torch.zeros_like)),
            "mean": nll(splice(lambda a: mean.expand_as(a))),
        }
        for c in coders:
            parts[c.name] = nll(splice(lambda a, c=c: c.reconstruct(c.encode(a), a)))
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value
    ce = {key: value / max(n_pred, 1) for key, value in sums.items()}
    out = {}
    for c in coders:
        out[c.name] = {
            "ce": ce[c.name],
            "ce_clean": ce["clean"],
            "ce_recovered_zero": recovered(ce["clean"], ce[c.name], ce["zero"]),
            "ce_recovered_mean": recovered(ce["clean"], ce[c.name], ce["mean"]),
        }
    return out


def recovered(clean: float, spliced: float, ablated: float) -> float:
    """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean): 1 = the model's own loss, 0 = the ablation's."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else float("nan")


# ------------------------------------------------------------------------------------------------ training
def train_saecli(exp: Any, name: str) -> Coder:
    """`saecli train` on the experiment (its defaults), then the saved dictionary as a coder."""
    from saecli.evaluation.evaluate import load_for_eval
    from saecli.runs import train

    start = time.perf_counter()
    folder = train(exp, overwrite=True).folder
    seconds = time.perf_counter() - start
    d = load_for_eval(folder)
    # d.decode(codes, x): the skip transcoder's output needs its input
    return Coder(
        name,
        torch.no_grad()(d.encode),
        torch.no_grad()(d.decode),
        exp.trainer.total_training_tokens / seconds,
        needs_input=exp.dictionary.kind == "transcoder",
    )


def train_peer(name: str, exp: Any, budget: Budget) -> Coder:
    batches = train_batches(exp)
    if exp.dictionary.kind == "transcoder":
        if name != "sparsify":
            raise PeerMissing(f"{name} has no skip transcoder here")
        return train_sparsify(batches, budget, name="sparsify skip transcoder", transcode=True)
    if name == "sparsify":
        return train_sparsify(batches, budget, name=name)
    if name == "sparsify-adam-cut":
        return train_sparsify(batches, budget, optimizer="adam", lr_warmup_steps=cut_steps(1000, budget), name=name)
    if name == "dictionary_learning":
        return train_dictionary_learning(batches, budget, name=name)
    if name == "dictionary_learning-cut":
        return train_dictionary_learning(
            batches,
            budget,
            warmup_steps=cut_steps(1000, budget),
            dead_tokens=cut_tokens(10_000_000, budget),
            threshold_start_step=cut_steps(1000, budget),
            name=name,
        )
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


# -------------------------------------------------------------------------------------------------- table
COLUMNS = (
    ("EV", "ev", "{:.3f}"),
    ("EV typ", "ev_typical", "{:.3f}"),
    ("L0", "l0", "{:.1f}"),
    ("dead %", "dead_pct", "{:.1f}"),
    ("CE rec 0", "ce_recovered_zero", "{:.3f}"),
    ("CE rec mean", "ce_recovered_mean", "{:.3f}"),
    ("tok/s", "tokens_per_s", "{:,.0f}"),
)


def table(rows: list[dict]) -> str:
    """A plain markdown table (pasted as is into notes and issues)."""
    head = "| library | " + " | ".join(c[0] for c in COLUMNS) + " | note |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [
            fmt.format(r[key]) if isinstance(r.get(key), (int, float)) and not math.isnan(r[key]) else "–"
            for _, key, fmt in COLUMNS
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r.get('note', '')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python benchmarks/bench_quality.py --quick\n"
        "  python benchmarks/bench_quality.py --tokens 1000000 --peers sparsify",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment file (model, hook, d_sae, k)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default: the file's budget)")
    p.add_argument(
        "--eval-tokens", type=int, default=None, help="held-out tokens scored (default: eval.total_eval_tokens)"
    )
    p.add_argument("--ce-contexts", type=int, default=None, help="held-out contexts for CE (default: eval.ce_contexts)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40,960 tokens, 8,192 scored, 2 CE contexts")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)} ('' = none)")
    p.add_argument(
        "--saecli-row",
        action="append",
        default=[],
        metavar="K=V;K=V",
        help="an extra saecli row: overrides separated by ';' (repeatable, one row each)",
    )
    p.add_argument("--no-defaults", action="store_true", help="leave out the 'saecli defaults' row (tuning runs)")
    p.add_argument(
        "--cache-root",
        type=Path,
        default=None,
        help="where the caches go (default runs/cache/quality); an existing cache is reused",
    )
    p.add_argument(
        "--hook",
        default=None,
        help="the hook point the SAE rows read (default: the file's first; "
        "any hook of the cache, e.g. blocks.6.hook_resid_post for a second layer)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    base = load(args.config, [])
    tokens = args.tokens or (40_960 if args.quick else base.trainer.total_training_tokens)
    eval_tokens = args.eval_tokens or (8_192 if args.quick else base.eval.total_eval_tokens)
    n_ce = args.ce_contexts or (2 if args.quick else base.eval.ce_contexts)
    root = args.cache_root or Path(base.activations.cache_dir).parent / "quality"
    cache_overrides, first_heldout = caches(args.config, tokens, eval_tokens, root)
    read = sorted(set(io_hooks(base))) if base.dictionary.kind == "transcoder" else [args.hook or io_hooks(base)[0]]
    common = cache_overrides + [
        f"trainer.total_training_tokens={tokens}",
        "store.backend='none'",
        "activations.hook_points=[" + ", ".join(f"'{h}'" for h in read) + "]",
    ]
    out_root = Path(base.run.output_dir)

    coders: list[Coder] = []
    variants = [] if args.no_defaults else [("saecli defaults", [])]
    for row in args.saecli_row:
        sets = [s.strip() for s in row.split(";") if s.strip()]
        variants.append(("saecli " + " ".join(sets), sets))
    for i, (name, sets) in enumerate(variants):
        exp = load(args.config, common + sets + [f"run.output_dir='{out_root / f'{tokens}-{i}'}'"])
        print(f"[bench_quality] training {name} on {tokens:,} tokens", flush=True)
        coders.append(train_saecli(exp, name))

    exp = load(args.config, common)
    budget = Budget(
        d_model=0,
        d_sae=exp.dictionary.d_sae,
        k=exp.dictionary.k,
        steps=tokens // exp.activations.batch_size,
        batch_tokens=exp.activations.batch_size,
    )
    x, y = (t[:eval_tokens] for t in heldout_activations(exp))
    budget.d_model = int(x.shape[1])
    skipped: list[dict] = []
    for peer in [p for p in args.peers.split(",") if p]:
        print(f"[bench_quality] training {peer} on {budget.tokens:,} tokens", flush=True)
        try:
            coders.append(train_peer(peer, exp, budget))
        except PeerMissing as exc:
            skipped.append({"name": peer, "note": f"skipped: {exc}"})

    print(f"[bench_quality] scoring on {x.shape[0]:,} held-out tokens and {n_ce} contexts", flush=True)
    from saecli.lm import load_model

    lm = load_model(exp.model)
    typical = typical_mask(y)
    ce = ce_scores(lm, io_hooks(exp), ce_contexts(exp, lm, first_heldout, n_ce), coders, y.mean(0))
    rows = []
    for c in coders:
        rows.append(
            {
                "name": c.name,
                **reconstruction_scores(c, x, y, typical),
                **ce[c.name],
                "tokens_per_s": c.tokens_per_s,
                "note": c.note,
            }
        )
    rows += skipped
    print(
        f"\n{tokens:,} training tokens ({budget.steps} steps of {budget.batch_tokens}), "
        f"{x.shape[0]:,} held-out tokens, {n_ce} CE contexts; {exp.dictionary.kind} {' → '.join(dict.fromkeys(io_hooks(exp)))}, "
        f"d_sae {exp.dictionary.d_sae}, k {exp.dictionary.k}"
    )
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
