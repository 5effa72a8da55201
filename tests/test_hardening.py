"""Issue #11, one reproduction per item: each failure a new user met, turned into a test of the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_toml

from saecli.errors import RunError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"


def _saved_sae(folder: Path, d_model: int = 64, hook: str = HOOK) -> Path:
    from saecli.dictionaries.registry import build_dictionary
    from saecli.dictionaries.sae_config import SAEConfig

    torch.manual_seed(0)
    build_dictionary(SAEConfig(d_sae=32, k=4), d_model, [hook]).save(folder)
    return folder


def _experiment(path: Path, *, model: str, out: str, extra: str = "") -> Path:
    return write_toml(
        path,
        textwrap.dedent(f'''
        [run]
        name = "hard"
        output_dir = "{out}"
        [model]
        name = "{model}"
        device = "cpu"
        [activations]
        hook_points = ["{HOOK}"]
        context_size = 32
        model_batch_size = 4
        batch_size = 128
        shuffle_buffer_tokens = 512
        [sae]
        d_sae = 32
        k = 4
        [store]
        backend = "none"
        [analyze]
        dla_top = 3
    ''')
        + textwrap.dedent(extra),
    )


# 1 ---------------------------------------------------------------- a run folder is the run
def test_a_copied_run_folder_is_used_from_another_directory_and_touches_only_itself(
    tmp_path, tiny_llama, run_cli, monkeypatch
):
    from saecli.config.load import load_experiment, write_resolved

    monkeypatch.chdir(tmp_path)
    os.symlink(tiny_llama, tmp_path / "model")  # a model path relative to where the run started
    original = tmp_path / "runs" / "a"
    exp = load_experiment(_experiment(tmp_path / "exp.toml", model="model", out="runs/a"))
    _saved_sae(original)
    write_resolved(exp, original)
    saved = (original / "config.toml").read_text()
    assert f'name = "{tmp_path / "model"}"' in saved and f'output_dir = "{original}"' in saved  # written absolute

    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(original, copy)
    monkeypatch.chdir(tmp_path / "elsewhere")  # another directory: `model` means nothing here
    result = run_cli("dla", "b")
    assert result.exit_code == 0, result.output
    assert (copy / "dla.json").exists() and not (original / "dla.json").exists()

    again = load_experiment(copy)  # whatever run.output_dir / eval.sae_path the file names, the folder is the run
    assert again.run.output_dir == str(copy) and again.eval.sae_path is None


def test_relative_paths_resolve_against_the_current_directory_for_every_key(tmp_path, monkeypatch):
    from saecli.config.load import load_experiment

    monkeypatch.chdir(tmp_path)
    exp = load_experiment(
        _experiment(
            tmp_path / "sub" / "exp.toml", model="org/hub-model", out="runs/x", extra='[eval]\ncache_dir = "c"\n'
        ),
        ["store.backend=sqlite", "store.path=r.db", "activations.cache_dir=cache"],
    )
    assert exp.run.output_dir == str(tmp_path / "runs/x")
    assert exp.store.path == str(tmp_path / "r.db")  # not beside the experiment file (sub/) any more
    assert exp.activations.cache_dir == str(tmp_path / "cache") and exp.eval.cache_dir == str(tmp_path / "c")
    assert exp.model.name == "org/hub-model"  # a hub name stays a hub name
    assert exp.dataset.path == "builtin:python-docs"


# 2 ---------------------------------------------------------------- sweeps validate their base whole
@pytest.mark.parametrize(
    "override, key",
    [
        ('dictionary.k="lots"', "dictionary.k"),
        ("sae.k=-9", "dictionary.k"),
        ('trainer.lr="lots"', "trainer.lr"),
        ("trainer.lr=-1", "trainer.lr"),
    ],
)
def test_a_sweep_refuses_a_bad_base_value_that_its_grid_overrides(run_cli, override, key):
    from conftest import REPO

    result = run_cli("sweep", REPO / "experiments/tiny/sweep.toml", "--set", override, "--dry-run")
    assert result.exit_code == 2, result.output
    assert key in result.output and "base experiment" in result.output and "Traceback" not in result.output


# 3 ---------------------------------------------------------------- cross-key rules at load
def test_a_hook_point_missing_from_activations_is_a_config_error_before_any_work(tmp_path, run_cli):
    out = tmp_path / "run"
    exp = _experiment(tmp_path / "exp.toml", model="no-such-model", out=str(out))
    result = run_cli("train", exp, "--set", "sae.hook_point=blocks.0.hook_resid_post")
    assert result.exit_code == 2, result.output
    assert "sae.hook_point" in result.output and "activations.hook_points" in result.output
    assert not out.exists()  # no folder holding only config.toml


@pytest.mark.parametrize(
    "kind, sets, key",
    [
        ("transcoder", ["sae.hook_point_out=blocks.2.hook_mlp_out"], "sae.hook_point_out"),
        ("transcoder", [], "activations.hook_points"),
        ("crosscoder", ['sae.hook_points=["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]'], "sae.hook_points"),
        ("clt", [], "activations.hook_points"),
    ],
)
def test_every_kinds_hook_keys_are_checked_against_activations(tmp_path, kind, sets, key):
    from saecli.config.load import load_experiment
    from saecli.errors import ConfigError

    exp = _experiment(tmp_path / "exp.toml", model="m", out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_experiment(exp, [f'sae.kind="{kind}"', *sets])


# 4 ---------------------------------------------------------------- broken dictionary files
def _damage(folder: Path, how: str) -> None:
    weights, cfg = folder / "sae_weights.safetensors", folder / "cfg.json"
    data = weights.read_bytes()
    if how == "truncated weights":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty weights":
        weights.write_bytes(b"")
    elif how == "corrupt weights":
        weights.write_bytes(b"\xff" * 8 + data[8:])
    elif how == "truncated cfg.json":
        cfg.write_text(cfg.read_text()[:40])
    elif how == "empty cfg.json":
        cfg.write_text("")
    elif how == "SAELens folder":
        cfg.write_text(json.dumps({"d_in": 64, "d_sae": 32, "hook_name": "blocks.1.hook_resid_post"}))
    elif how == "sparsify folder":
        weights.rename(folder / "sae.safetensors")


DAMAGE = {
    "truncated weights": ("sae_weights.safetensors", "damaged"),
    "empty weights": ("sae_weights.safetensors", "damaged"),
    "corrupt weights": ("sae_weights.safetensors", "damaged"),
    "truncated cfg.json": ("cfg.json", "not valid JSON"),
    "empty cfg.json": ("cfg.json", "is empty"),
    # read as SAELens (saecli.interop): its weights don't fit the SAELens cfg.json
    "SAELens folder": ("sae_weights.safetensors", "cfg.json says [d_in, d_sae]"),
    "sparsify folder": ("sae.safetensors", "sparsify"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_broken_dictionary_folder_names_the_file_and_what_is_wrong(tmp_path, how):
    from saecli.dictionaries.registry import load_dictionary

    folder = _saved_sae(tmp_path / "sae")
    _damage(folder, how)
    name, what = DAMAGE[how]
    with pytest.raises(UsageError) as info:
        load_dictionary(folder)
    assert name in str(info.value) and what in str(info.value)


def test_a_read_only_dictionary_folder_is_refused_before_the_model_loads(tmp_path, run_cli, monkeypatch):
    import saecli.lm

    folder = _saved_sae(tmp_path / "sae")
    exp = _experiment(tmp_path / "exp.toml", model="m", out=str(folder))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    monkeypatch.setattr(saecli.lm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in ("analyze", "dla", "eval"):
        result = run_cli(command, exp)
        assert result.exit_code == 2, (command, result.output)
        assert "not writable" in result.output and str(folder) in result.output.replace("\n", "")


# 5 ---------------------------------------------------------------- cache chunks verified as read
def _cache(root: Path, n_chunks: int = 3, rows: int = 256) -> Path:
    from saecli.data.cache import write_cache

    g = torch.Generator().manual_seed(0)

    def chunks():
        for c in range(n_chunks):
            ids = torch.arange(c * rows, (c + 1) * rows)
            yield {f"acts.{HOOK}": torch.randn(rows, 8, generator=g), "tokens": ids, "doc": ids // 64, "pos": ids % 64}

    write_cache(root, chunks(), hook_points=[HOOK], chunk_tokens=rows)
    return root


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_chunk_stops_the_stream_naming_the_chunk(tmp_path):
    from saecli.data.reader import CacheStream

    root = _cache(tmp_path / "cache")
    bad = root / "shard-000" / "chunk-000001.safetensors"
    _flip_a_byte(bad)
    stream = CacheStream(root, batch_size=128, buffer_tokens=256, epochs=1)
    with pytest.raises(UsageError) as info:
        list(stream)
    assert str(bad) in str(info.value) and "saecli check" in str(info.value)


def test_skip_mode_leaves_a_damaged_chunk_out_with_a_warning(tmp_path):
    from saecli.data.reader import CacheStream
    from saecli.errors import SaecliWarning

    root = _cache(tmp_path / "cache")
    bad = root / "shard-000" / "chunk-000002.safetensors"
    _flip_a_byte(bad)
    stream = CacheStream(root, batch_size=128, buffer_tokens=256, epochs=1, verify="skip")
    with pytest.warns(SaecliWarning, match="chunk-000002"):
        n = sum(b.n_tokens for b in stream)
    assert n == 2 * 256 and stream.skipped_chunks == [bad]


def test_a_truncated_chunk_is_found_when_the_stream_opens(tmp_path):
    from saecli.data.reader import CacheStream

    root = _cache(tmp_path / "cache")
    bad = root / "shard-000" / "chunk-000002.safetensors"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(UsageError, match="chunk-000002.*truncated"):
        CacheStream(root, batch_size=128, buffer_tokens=256)


# 6 ---------------------------------------------------------------- disk full
def test_disk_full_during_a_checkpoint_names_the_file_and_the_intact_checkpoint(tmp_path, monkeypatch):
    from saecli import fsio
    from saecli.training import checkpoint as ck

    weights = {"w": torch.zeros(256, 64)}
    first = ck.save_checkpoint(tmp_path, 10, weights, {"step": 10})

    def full(path, state):  # what torch.save says when the disk fills
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        )

    monkeypatch.setattr(ck, "_write_state", full)
    monkeypatch.setattr(fsio, "free_bytes", lambda folder: 4096)
    with pytest.raises(RunError) as info:
        ck.save_checkpoint(tmp_path, 20, weights, {"step": 20, "adam": torch.zeros(256, 64)})
    text = str(info.value)
    assert "disk is full" in text and "step_00000020" in text and "KiB" in text
    assert str(first) in text and "intact" in text
    assert ck.latest_checkpoint(tmp_path) == (10, first)
    assert not list((tmp_path / "checkpoints").glob(".step_*"))


def test_disk_full_on_a_result_file_names_it(tmp_path, monkeypatch):
    import errno

    from saecli.fsio import DiskFullError, write_with

    def full(path: Path) -> None:
        path.write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"features\.safetensors, which needs about 1\.0 MiB"):
        write_with(tmp_path / "features.safetensors", full, size_hint=1 << 20)
    assert os.listdir(tmp_path) == []


def test_generate_refuses_when_the_disk_cannot_hold_the_cache(tmp_path, tiny_llama, run_cli, monkeypatch):
    from saecli import fsio

    monkeypatch.setattr(fsio, "free_bytes", lambda folder: 10_000)
    exp = _experiment(
        tmp_path / "exp.toml",
        model=str(tiny_llama),
        out=str(tmp_path / "r"),
        extra='[dataset]\npath = "builtin:python-docs"\n',
    )
    result = run_cli(
        "generate",
        exp,
        "--set",
        f'activations.cache_dir="{tmp_path / "cache"}"',
        "--set",
        "activations.total_tokens=4096",
    )
    assert result.exit_code == 2, result.output
    assert "needs about" in result.output and "free" in result.output
    assert not list((tmp_path / "cache").glob("shard-*/chunk-*"))


# 7 ---------------------------------------------------------------- nothing half-written stays
def test_result_files_are_0644_and_stale_temporaries_go_with_the_next_write(tmp_path):
    from safetensors.torch import save_file

    from saecli import fsio

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    folder = tmp_path / "analysis"
    folder.mkdir()
    stale = folder / f"{fsio._TMP_PREFIX}{fsio._HOST}-{dead_pid}-abc"
    stale.mkdir()
    (stale / ".tmpXYZ123").write_bytes(b"\0" * 1000)  # what a killed safetensors write leaves
    live = folder / f"{fsio._TMP_PREFIX}{fsio._HOST}-{os.getppid()}-def"  # a process still running
    live.mkdir()

    old = os.umask(0o022)
    try:
        fsio.write_with(folder / "features.safetensors", lambda p: save_file({"a": torch.zeros(3)}, str(p)))
    finally:
        os.umask(old)
    assert not stale.exists() and live.exists()
    assert (folder / "features.safetensors").stat().st_mode & 0o777 == fsio.FILE_MODE == 0o644
    assert sorted(p.name for p in folder.iterdir()) == sorted(["features.safetensors", live.name])


def test_a_saved_dictionary_is_readable_by_others(tmp_path):
    folder = _saved_sae(tmp_path / "sae")
    for name in ("sae_weights.safetensors", "cfg.json"):
        assert (folder / name).stat().st_mode & 0o044 == 0o044, name


# 8 ---------------------------------------------------------------- the store never costs a run
def test_an_unreachable_store_is_said_at_once_and_record_adds_the_run_later(tmp_path, tiny_llama, run_cli):
    folder = _saved_sae(tmp_path / "sae")
    (folder / "summary.json").write_text(json.dumps({"step": 4, "l0": 3.5}))
    not_a_db = tmp_path / "a-folder.db"
    not_a_db.mkdir()
    exp = _experiment(
        tmp_path / "exp.toml", model=str(tiny_llama), out=str(folder), extra="[eval]\ntotal_eval_tokens = 64\n"
    )
    from saecli.config.load import load_experiment, write_resolved

    write_resolved(load_experiment(exp, ["store.backend=sqlite", f'store.path="{not_a_db}"']), folder)

    result = run_cli("dla", folder)
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    assert "unreachable" in out and "saecli record" in out and (folder / "dla.json").exists()

    db = tmp_path / "results.db"
    result = run_cli("record", folder, "--set", f'store.path="{db}"')
    assert result.exit_code == 0, result.output
    assert str(db) in result.output.replace("\n", "")
    from saecli.store.sqlite import SQLiteStore

    with SQLiteStore(db) as store:
        rec = store.get_sae("hard")
        assert rec is not None and rec["metrics"]["l0"] == 3.5 and rec["path"] == str(folder.resolve())


def test_record_refuses_a_run_without_a_store_or_unfinished(tmp_path, run_cli):
    folder = _saved_sae(tmp_path / "sae")
    from saecli.config.load import load_experiment, write_resolved

    write_resolved(load_experiment(_experiment(tmp_path / "exp.toml", model="m", out=str(folder))), folder)
    result = run_cli("record", folder)
    assert result.exit_code == 2 and "store.backend" in result.output
    result = run_cli("record", folder, "--set", "store.backend=sqlite")
    assert result.exit_code == 2 and "no finished run" in result.output


# 9 ---------------------------------------------------------------- metrics that cannot be trusted say so
def test_loss_recovered_by_hand_and_undefined_when_the_ablation_barely_moves_the_loss():
    from saecli.evaluation.splice import SpliceSums, recovered

    assert recovered(clean=2.0, spliced=2.5, ablated=4.0, min_gap=0.05, what="zero") == (0.75, None)
    value, why = recovered(clean=2.0, spliced=2.05, ablated=2.01, min_gap=0.05, what="zero")
    assert value is None and "+0.01 nats" in why  # (2.01 − 2.05) / 0.01 = −4 would be printed otherwise
    assert recovered(2.0, 2.0, 1.9, 0.0, "mean")[0] is None  # an ablation that helps: no ratio either
    sums = SpliceSums(n_tokens=10, ce_clean=20.0, ce_spliced=25.0, ce_zero=40.0, ce_mean=30.0)
    r = sums.result(min_gap=0.05)
    assert r["loss_recovered"] == pytest.approx(0.75)  # (4 − 2.5) / (4 − 2)
    assert r["loss_recovered_mean_ablation"] == pytest.approx(0.5)  # (3 − 2.5) / (3 − 2)
    assert "loss_recovered_undefined" not in r


def test_a_reconstruction_by_the_mean_scores_as_the_mean_ablation(tiny_llama):
    from test_eval import Mapped, _batch

    from saecli.config.model import ModelConfig
    from saecli.evaluation.splice import splice_batch
    from saecli.lm import load_model

    lm = load_model(ModelConfig(name=str(tiny_llama), device="cpu"))
    tokens, mask = _batch()
    keep = mask.reshape(-1)

    def mean_of_counted(x: torch.Tensor) -> torch.Tensor:  # rows are the counted positions only
        return x.double().mean(0, keepdim=True).to(x.dtype).expand_as(x)

    r = splice_batch(lm, Mapped(lm.d_model, HOOK, HOOK, mean_of_counted), tokens, mask).result(min_gap=0)
    assert keep.sum() < keep.numel()  # BOS keeps its activation in both runs
    assert r["ce_loss_spliced"] == pytest.approx(r["ce_loss_mean_ablation"], abs=1e-5)
    assert r["kl_div_spliced"] == pytest.approx(r["kl_div_mean_ablation"], abs=1e-5)


# 10 --------------------------------------------------------------- progress counts agree with the work
def test_the_train_bar_ends_at_its_total_when_batches_hold_fewer_counted_tokens():
    from saecli.config.base import parse
    from saecli.config.dictionary import DictionaryConfig
    from saecli.config.init import InitConfig
    from saecli.config.trainer import TrainerConfig
    from saecli.data.batch import Batch
    from saecli.data.synthetic import SyntheticStream
    from saecli.dictionaries.registry import build_dictionary
    from saecli.training import Member, fit, initialize

    class Masked(SyntheticStream):  # like LORSA's padded contexts: the counted tokens vary per batch (90..110)
        def make_batch(self, index: int) -> Batch:
            b = super().make_batch(index)
            n = 100 + 10 * (index % 3 - 1)
            return Batch({h: a[:n] for h, a in b.acts.items()}, b.tokens[:n])

    class Recorder:
        total = done = 0

        def start(self, total_tokens, done_tokens):
            self.total, self.done = total_tokens, done_tokens

        def advance(self, n):
            self.done += n

        def log(self, member, record): ...

        def warn(self, message): ...

        def info(self, message): ...

    stream = Masked(d_model=16, n_atoms=32, k=3, batch_size=128)
    d = build_dictionary(parse(DictionaryConfig, {"d_sae": 32, "k": 3}), 16, [stream.hook_points[0]])
    tokens = initialize(stream, [(d, InitConfig())])
    cfg = parse(
        TrainerConfig,
        {"total_training_tokens": 128 * 6, "log_frequency": 100, "n_checkpoints": 0, "checkpoint_every_seconds": 0},
    )
    member = Member(d, cfg, total_steps=6, batch_tokens=tokens, name="m")
    rec = Recorder()
    fit(stream, [member], reporter=rec)
    assert rec.total == 6 * tokens and rec.done == rec.total  # was the sum of the varying counts: unfinished


def test_the_analyze_bar_ends_at_the_tokens_analysed(monkeypatch):
    from saecli import ui

    monkeypatch.setitem(ui._state, "quiet", False)
    with ui.progress("analyze", total=40000) as bar:
        bar.advance(40299)  # whole batches pass the budget
        bar.finish(40299)
        task = bar._progress.tasks[0]
    assert task.total == task.completed == 40299 and task.finished


def test_generate_reports_the_chunks_it_wrote(tmp_path, tiny_llama):
    from saecli.config.load import load_experiment
    from saecli.data.cache import generate_shard
    from saecli.lm import load_model, run_to_hooks

    exp = load_experiment(
        _experiment(tmp_path / "exp.toml", model=str(tiny_llama), out=str(tmp_path / "r")),
        [f'activations.cache_dir="{tmp_path / "c"}"', "activations.total_tokens=2000", "activations.chunk_tokens=384"],
    )
    seen: list[int] = []
    manifest = generate_shard(
        exp, load_model(exp.model), run_to_hooks, 0, 1, progress=lambda n, metrics: seen.append(metrics["chunks"])
    )
    assert seen[-1] == len(manifest["chunks"]) == 5  # the bar's last count is the summary's (was one behind)


def test_disk_full_during_a_sharded_checkpoint_names_it_and_keeps_the_last(tmp_path, monkeypatch):
    """A tensor-parallel run writes DCP checkpoints: a full disk while DCP writes its shards is the same
    one-paragraph error as for an ordinary checkpoint, and leaves the last one whole."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_files

    from saecli.training import checkpoint as ck
    from saecli.training.dcp import save_sharded_checkpoint

    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    first = save_sharded_checkpoint(tmp_path, 10, model, optimizer, {"step": 10}, is_main=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_files, "_write_item", full)
    with pytest.raises(RunError) as info:
        save_sharded_checkpoint(tmp_path, 20, model, optimizer, {"step": 20}, is_main=True)
    text = str(info.value)
    assert "disk is full" in text and "step_00000020" in text and "KiB" in text  # 3 × 2,080 floats ≈ 24 KiB
    assert str(first) in text and "intact" in text
    assert ck.latest_checkpoint(tmp_path) == (10, first)
    assert not list((tmp_path / "checkpoints").glob(".step_*"))
