"""From activations you already have to an exported dictionary and back into training, through the CLI:
`saecli cache import`, `train`, `export`, `eval --sae`, and `[sae] pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_toml

from saecli.config.base import parse
from saecli.config.dictionary import DictionaryConfig
from saecli.config.load import read_toml
from saecli.dictionaries.registry import build_dictionary, load_dictionary
from saecli.errors import ConfigError
from saecli.interop.activations import import_activations
from saecli.interop.pretrained import start_from

HOOK = "blocks.0.hook_resid_post"
D = 16


def _activations(n: int = 4096, seed: int = 0) -> np.ndarray:
    """Sparse combinations of 24 directions, offset from zero and scaled like a residual stream (norm ≈ 8)."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((24, D))
    codes = rng.exponential(1.0, (n, 24)) * (rng.random((n, 24)) < 0.15)
    return (2.0 * (codes @ dirs) + 1.0).astype(np.float32)


def _experiment(tmp_path: Path, name: str, cache: Path, sae: str, tokens: int = 4096) -> Path:
    return write_toml(
        tmp_path / f"{name}.toml",
        f'''
[run]
name = "{name}"
output_dir = "{tmp_path / "runs" / name}"
[activations]
hook_points = ["{HOOK}"]
cache_dir = "{cache}"
source = "cache"
batch_size = 256
shuffle_buffer_tokens = 1024
[sae]
d_sae = 32
{sae}
[trainer]
total_training_tokens = {tokens}
lr = 3e-3
log_frequency = 4
[store]
backend = "none"
''',
    )


@pytest.fixture
def imported_cache(tmp_path, run_cli) -> Path:
    np.save(tmp_path / "acts.npy", _activations())
    res = run_cli(
        "cache", "import", tmp_path / "acts.npy", tmp_path / "cache", "--hook", HOOK, "--chunk-tokens", "1000"
    )
    assert res.exit_code == 0, res
    return tmp_path / "cache"


def test_imported_activations_train_and_the_run_records_them_as_its_data(tmp_path, run_cli, imported_cache):
    manifest = json.loads((imported_cache / "shard-000/manifest.json").read_text())
    assert manifest["total_tokens"] == 4096 and len(manifest["chunks"]) == 5 and manifest["complete"]
    exp = _experiment(tmp_path, "topk", imported_cache, 'activation = "topk"\nk = 4')
    assert run_cli("train", exp).exit_code == 0
    resolved = read_toml(tmp_path / "runs/topk/config.toml")
    assert resolved["dataset"]["path"] == f"imported:{(tmp_path / 'acts.npy').resolve()}"


def test_sequences_and_several_hooks_import_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    from saecli.data.reader import CacheStream

    acts = torch.from_numpy(_activations(6 * 50)).reshape(6, 50, D)
    save_file(
        {"resid": acts, "mlp": 2 * acts, "input_ids": torch.arange(300).reshape(6, 50)}, str(tmp_path / "a.safetensors")
    )
    m = import_activations(
        tmp_path / "a.safetensors",
        tmp_path / "c",
        hook_points=["h.resid", "h.mlp"],
        keys={"h.resid": "resid", "h.mlp": "mlp"},
        chunk_tokens=128,
    )
    assert m["total_tokens"] == 300 and m["hook_points"] == ["h.resid", "h.mlp"]
    batch = next(
        iter(CacheStream(tmp_path / "c", hook_points=["h.resid", "h.mlp"], batch_size=300, shuffle=False, epochs=1))
    )
    assert torch.allclose(batch.acts["h.mlp"], 2 * batch.acts["h.resid"])


def test_a_missing_tensor_names_the_ones_there(tmp_path, run_cli):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(4, D), "b": torch.zeros(4, D)}, str(tmp_path / "x.safetensors"))
    res = run_cli("cache", "import", tmp_path / "x.safetensors", tmp_path / "c", "--hook", HOOK)
    assert res.exit_code == 2 and "--key" in res.output and "a, b" in res.output


def test_export_eval_and_continue_training_from_the_export(tmp_path, run_cli, imported_cache):
    exp = _experiment(tmp_path, "topk-run", imported_cache, 'activation = "topk"\nk = 4')
    assert run_cli("train", exp).exit_code == 0
    run = tmp_path / "runs/topk-run"
    res = run_cli("export", run, "--format", "saelens", tmp_path / "sl")
    assert res.exit_code == 0, res
    assert "self-check passed" in " ".join(res.output.split())
    res = run_cli("eval", exp, "--sae", tmp_path / "sl", "--set", "eval.total_eval_tokens=1024")
    assert res.exit_code == 0, res
    ev = json.loads((tmp_path / "sl/eval.json").read_text())["metrics"]["explained_variance"]
    native = run_cli("eval", exp, "--set", "eval.total_eval_tokens=1024")
    assert native.exit_code == 0
    assert ev == pytest.approx(json.loads((run / "eval.json").read_text())["metrics"]["explained_variance"], abs=1e-4)

    # an experiment that names the export as pretrained evaluates it before any training
    only = _experiment(
        tmp_path, "only", imported_cache, f'activation = "topk"\nk = 4\npretrained = "{tmp_path / "sl"}"'
    )
    assert run_cli("eval", only, "--set", "eval.total_eval_tokens=1024").exit_code == 0
    assert json.loads((tmp_path / "sl/eval.json").read_text())["metrics"]["explained_variance"] == pytest.approx(ev)

    more = _experiment(
        tmp_path, "more", imported_cache, f'activation = "topk"\nk = 4\npretrained = "{tmp_path / "sl"}"', tokens=512
    )
    assert run_cli("train", more).exit_code == 0
    # after 2 more steps at a small lr it is still the exported dictionary, not a fresh one
    a, b = load_dictionary(run), load_dictionary(tmp_path / "runs/more")
    cos = torch.nn.functional.cosine_similarity(a.W_dec, b.W_dec, dim=1)
    assert cos.mean() > 0.9


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_start_from_converts_into_this_runs_units_exactly(tmp_path, activation):
    from test_interop import _dictionary, _raw_batch

    # gated: the exported rows have unit norm, so one BatchTopK threshold holds in this run's unit-norm units
    src = _dictionary(activation, sparsity_include_decoder_norm=True)
    src.fold_activation_scale()
    src.save(tmp_path / "run")
    from saecli.interop import export_dictionary

    export_dictionary(tmp_path / "run", "saelens", tmp_path / "sl")
    table = {"d_sae": 48, "activation": activation, "k": 6, "decoder_unit_norm": activation != "topk"}
    d = build_dictionary(parse(DictionaryConfig, table, key="sae"), 16, ["blocks.1.ln2.hook_normalized"])
    d.set_dataset_norm("blocks.1.ln2.hook_normalized", 3.0)  # what initialize() measured on this run's data
    start_from(d, tmp_path / "sl")
    x = _raw_batch()
    with torch.no_grad():
        want = src.reconstruct({"blocks.1.ln2.hook_normalized": x})["blocks.1.ln2.hook_normalized"]
        got = d.eval().reconstruct({"blocks.1.ln2.hook_normalized": x})["blocks.1.ln2.hook_normalized"]
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-4)


def test_start_from_a_batchtopk_whose_rows_differ_in_norm_into_unit_rows_names_the_key(tmp_path):
    """A BatchTopK that ranked by h (rows of any norm) cannot become one with unit rows and one threshold."""
    from test_interop import _dictionary

    from saecli.interop import export_dictionary

    src = _dictionary("batchtopk")  # ungated: its decoder rows keep their norms
    src.save(tmp_path / "run")
    export_dictionary(tmp_path / "run", "saelens", tmp_path / "sl")
    table = {"d_sae": 48, "activation": "batchtopk", "k": 6, "decoder_unit_norm": True}
    d = build_dictionary(parse(DictionaryConfig, table, key="sae"), 16, ["blocks.1.ln2.hook_normalized"])
    with pytest.raises(ConfigError, match="holds one") as info:
        start_from(d, tmp_path / "sl")
    assert info.value.key == "dictionary.decoder_unit_norm"
    unit_free = build_dictionary(
        parse(DictionaryConfig, {**table, "decoder_unit_norm": False}, key="sae"), 16, ["blocks.1.ln2.hook_normalized"]
    )
    start_from(unit_free, tmp_path / "sl")  # keeping the rows' norms, it loads (and passes its self-check)


def test_start_from_a_dictionary_of_another_size_names_the_key(tmp_path):
    from test_interop import _dictionary

    src = _dictionary("topk")
    src.save(tmp_path / "run")
    d = build_dictionary(
        parse(DictionaryConfig, {"d_sae": 64, "k": 6}, key="sae"), 16, ["blocks.1.ln2.hook_normalized"]
    )
    with pytest.raises(ConfigError, match="dictionary.d_sae"):
        start_from(d, tmp_path / "run")


def test_a_saved_datasets_folder_imports_a_column_per_hook(tmp_path):
    import datasets

    acts = _activations(40)
    datasets.Dataset.from_dict({"resid": acts.tolist(), "input_ids": list(range(40))}).save_to_disk(
        str(tmp_path / "ds")
    )
    m = import_activations(tmp_path / "ds", tmp_path / "c", hook_points=[HOOK], keys={HOOK: "resid"})
    assert m["total_tokens"] == 40 and m["d_model"] == {HOOK: D}
    datasets.Dataset.from_dict({HOOK: acts.reshape(4, 10, D).tolist()}).to_parquet(str(tmp_path / "a.parquet"))
    m = import_activations(tmp_path / "a.parquet", tmp_path / "c2", hook_points=[HOOK])
    assert m["total_tokens"] == 40  # 4 sequences of 10 tokens


def test_export_errors_are_exit_2_and_say_why(tmp_path, run_cli):
    res = run_cli("export", tmp_path / "missing", tmp_path / "out")
    assert res.exit_code == 2 and "missing" in res.output and "Traceback" not in res.output
    cfg = parse(DictionaryConfig, {"kind": "clt", "d_sae": 4, "k": 1}, key="sae")
    run = build_dictionary(
        cfg,
        D,
        [
            "blocks.0.ln2.hook_normalized",
            "blocks.0.hook_mlp_out",
            "blocks.1.ln2.hook_normalized",
            "blocks.1.hook_mlp_out",
        ],
    ).save(tmp_path / "clt")
    res = run_cli("export", run, "--format", "saelens", tmp_path / "out")
    assert res.exit_code == 2 and "circuit-tracer" in " ".join(res.output.split())
