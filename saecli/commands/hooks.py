"""`saecli hooks`: list the hook points of the experiment's [model] (what hook_points may name)."""

from __future__ import annotations

import typer

from saecli.commands import ExperimentArg, SetOption, load


def hooks(experiment: ExperimentArg, overrides: SetOption = None) -> None:
    """Load the experiment's model and print every hook point name: a row per layer, a column per site.

    Every activation is d_model wide. The sites, in the order a block runs them:
    resid_pre (block input), attn_in (attention input, after its norm),
    attn_out (attention output as added to the residual), mlp_in (MLP input, after its norm),
    mlp_out (MLP output as added to the residual), resid_post (block output).

    Examples:

        saecli hooks experiments/smollm2/topk.toml

        saecli hooks exp.toml --set model.name=path/to/model --set model.device=cpu
    """
    from saecli import ui
    from saecli.lm import SITES, is_parallel, load_model

    exp = load(experiment, overrides)
    exp.require("model")
    lm = load_model(exp.model)
    rows = [{"layer": layer, **{site: f"blocks.{layer}.hook_{site}" for site in SITES}, "d_model": lm.d_model}
            for layer in range(lm.n_layers)]
    parallel = ", parallel attention/MLP" if is_parallel(lm) else ""
    ui.table(f"hook points of {lm.name} ({lm.family}, {lm.n_layers} layers, d_model {lm.d_model}{parallel})", rows)
    bos = "none" if lm.bos_token_id is None else str(lm.bos_token_id)
    ui.result(f"{lm.n_layers * len(SITES)} hook points, d_model {lm.d_model}, vocab {lm.vocab_size}, "
              f"BOS id {bos} (prepended: {'yes' if lm.prepend_bos else 'no'})")


def register(app: typer.Typer) -> None:
    app.command("hooks")(hooks)
