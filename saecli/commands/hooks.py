"""`saecli hooks`: list the hook points of the experiment's [model] (what hook_points may name)."""

from __future__ import annotations

import typer

from saecli.commands import ExperimentArg, SetOption, load


def hooks(experiment: ExperimentArg, overrides: SetOption = None) -> None:
    """Load the experiment's model and print every hook point name (TransformerLens names).

    In a terminal: one row per site, `blocks.{L}.<site>` with its width and what it holds; piped or
    redirected: every full name, one per line (for grep and scripts). The sites, in the order a block
    runs them: hook_resid_pre, ln1.hook_normalized (what attention reads), attn.hook_z (heads before W_O),
    hook_attn_out, hook_resid_mid, hook_mlp_in (before the MLP's norm), ln2.hook_normalized (what the MLP
    and a transcoder read), hook_mlp_out, hook_resid_post.

    Examples:

        saecli hooks experiments/smollm2/topk.toml

        saecli hooks exp.toml --set model.name=path/to/model --set model.device=cpu

        saecli hooks exp.toml | grep mlp
    """
    from saecli import ui
    from saecli.lm import is_parallel, load_model
    from saecli.lm.hooks import SITE_HELP, hook_names, hook_width, parse_hook

    exp = load(experiment, overrides)
    exp.require("model")
    lm = load_model(exp.model)
    names = hook_names(lm)
    bos = "none" if lm.bos_token_id is None else str(lm.bos_token_id)
    summary = (
        f"{len(names)} hook points, d_model {lm.d_model}, vocab {lm.vocab_size}, "
        f"BOS id {bos} (prepended: {'yes' if lm.prepend_bos else 'no'})"
    )
    if not ui.stdout_is_terminal():
        ui.plain_lines(names)
        ui.info(summary)
        return
    sites = list(dict.fromkeys(parse_hook(n).site for n in names))
    rows = [
        {"hook point": f"blocks.{{L}}.{site}", "width": hook_width(lm, f"blocks.0.{site}"), "holds": SITE_HELP[site]}
        for site in sites
    ]
    parallel = ", parallel attention/MLP" if is_parallel(lm) else ""
    ui.table(f"hook points of {lm.name} ({lm.family}{parallel}), L = 0 to {lm.n_layers - 1}", rows)
    ui.result(summary)


def register(app: typer.Typer) -> None:
    app.command("hooks")(hooks)
