"""Every example in experiments/, broken in every cheap way a user manages: each is exit 2, one paragraph
without a traceback, naming the key or the path, before any work (nothing written anywhere).

The mutations are derived from each file's own keys (wrong types, negative numbers, unknown keys,
cross-key conflicts) and bytes (truncated, not UTF-8, empty); run in this process, each takes
milliseconds because the config is refused before any model, data or dictionary loads. Broken run
folders (dictionary files, cache chunks) are the second half.
"""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import REPO, write_toml

from saecli.config.load import read_toml
from saecli.config.sweep import flatten_keys

EXAMPLES = sorted(REPO.glob("experiments/*/*.toml"))
NAMES = [str(p.relative_to(REPO / "experiments")) for p in EXAMPLES]
NEGATIVE_OK = {"run.seed"}  # any integer seeds the generators
# the hook key a cross-key conflict breaks, per kind (its value: a hook no example lists)
HOOK_KEYS = {
    "sae": "hook_point",
    "transcoder": "hook_point_in",
    "lorsa": "hook_point_in",
    "molt": "hook_point_in",
    "crosscoder": "hook_points",
    "clt": "hook_points_in",
}
ALIEN_HOOK = "blocks.99.hook_resid_post"


def _command(path: Path, data: dict) -> list[str]:
    if "sweep" in data:
        return ["sweep", "--dry-run"]
    if path.name == "generate.toml":
        return ["generate"]
    return ["train"]


def _wrong_type(value):
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "lots"
    if isinstance(value, str):
        return 123
    if isinstance(value, list):
        return {"not": "a list"}
    return None


def _set(data: dict, key: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _cases() -> list:
    """Per example: a wrong type and a negative for each key (once per key and command across the examples:
    the smollm2 and tiny files share most keys), an unknown key per section, a cross-key conflict."""
    cases = []
    seen: set[tuple] = set()
    for path, name in zip(EXAMPLES, NAMES):
        data = read_toml(path)
        base = {k: v for k, v in data.items() if k != "sweep"}
        for key, value in flatten_keys(base).items():
            if (key, _command(path, data)[0], type(value)) in seen:
                continue
            seen.add((key, _command(path, data)[0], type(value)))
            wrong = _wrong_type(value)
            if wrong is not None:
                cases.append(pytest.param(path, _set(data, key, wrong), [key], id=f"{name}:type:{key}"))
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NEGATIVE_OK:
                cases.append(pytest.param(path, _set(data, key, -abs(value) or -1), [key], id=f"{name}:negative:{key}"))
        for section in base:
            key = f"{section}.bogus_key"
            cases.append(pytest.param(path, _set(data, key, 1), [key], id=f"{name}:unknown:{key}"))
        if "sae" in base and "activations" in base:
            kind = base["sae"].get("kind", "sae")
            key = f"sae.{HOOK_KEYS[kind]}"
            hooks = list(base["activations"]["hook_points"])
            if kind == "clt":  # one input and one output per layer: the first input is foreign
                half = len(hooks) // 2
                broken = _set(_set(data, key, [ALIEN_HOOK] + hooks[1:half]), "sae.hook_points_out", hooks[half:])
            else:
                broken = _set(data, key, [ALIEN_HOOK] if "points" in key else ALIEN_HOOK)
            cases.append(pytest.param(path, broken, [key, "activations.hook_points"], id=f"{name}:cross:{key}"))
    return cases


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*") if p.is_file()}


def _assert_refused(result, *named: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "(run with --verbose" not in text, result.output
    for name in named:
        assert name in text, (name, result.output)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory: every relative output of the examples would land here."""
    monkeypatch.chdir(tmp_path)
    before = _snapshot(REPO / "experiments")
    yield tmp_path
    assert _snapshot(REPO / "experiments") == before  # the examples themselves are untouched


@pytest.mark.parametrize("path, data, keys", _cases())
def test_a_mutated_example_is_refused_naming_the_key(workdir, run_cli, path, data, keys):
    target = workdir / path.name
    target.write_text(tomli_w.dumps(data))
    command = _command(path, data)
    result = run_cli(command[0], target, *command[1:])
    _assert_refused(result, str(target), *keys)
    assert sorted(p.name for p in workdir.iterdir()) == [target.name]  # nothing else written


@pytest.mark.parametrize("how", ["truncated", "not UTF-8", "empty"])
@pytest.mark.parametrize("path", EXAMPLES, ids=NAMES)
def test_a_damaged_example_file_is_refused_naming_it(workdir, run_cli, path, how):
    text = path.read_text()
    target = workdir / path.name
    if how == "truncated":  # cut inside a quoted value past the middle: an unterminated string
        cut = text.index('= "', len(text) // 2) + 4
        target.write_text(text[:cut])
    elif how == "not UTF-8":
        target.write_bytes(text.encode()[:200] + b"\xff\xfe\x00" + text.encode()[200:])
    else:
        target.write_text("")
    command = _command(path, read_toml(path))
    result = run_cli(command[0], target, *command[1:])
    _assert_refused(result, str(target))
    assert sorted(p.name for p in workdir.iterdir()) == [target.name]


# ------------------------------------------------------------------ broken run folders
HOOK = "blocks.1.hook_resid_post"
DAMAGES = {
    "truncated weights": ("sae_weights.safetensors", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
    "empty weights": ("sae_weights.safetensors", lambda f: f.write_bytes(b"")),
    "corrupt weights": ("sae_weights.safetensors", lambda f: f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:])),
    "truncated cfg.json": ("cfg.json", lambda f: f.write_text(f.read_text()[:50])),
    "empty cfg.json": ("cfg.json", lambda f: f.write_text("")),
    "SAELens cfg.json": ("cfg.json", lambda f: f.write_text(json.dumps({"d_in": 64, "d_sae": 32, "hook_name": HOOK}))),
    "weights missing": ("sae_weights.safetensors", lambda f: f.unlink()),
}


def _run_folder(root: Path) -> Path:
    from saecli.config.load import load_experiment, write_resolved
    from saecli.dictionaries.registry import build_dictionary
    from saecli.dictionaries.sae_config import SAEConfig

    folder = root / "run"
    exp = write_toml(
        root / "exp.toml",
        textwrap.dedent(f'''
        [run]
        output_dir = "{folder}"
        [model]
        name = "{root / "no-model-needed"}"
        [activations]
        hook_points = ["{HOOK}"]
        [sae]
        d_sae = 32
        k = 4
        [store]
        backend = "none"
    '''),
    )
    build_dictionary(SAEConfig(d_sae=32, k=4), 64, [HOOK]).save(folder)
    write_resolved(load_experiment(exp), folder)
    return folder


@pytest.mark.parametrize("command", ["eval", "analyze", "dla"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_broken_dictionary_folder_is_refused_naming_the_file(tmp_path, run_cli, command, damage):
    folder = _run_folder(tmp_path)
    name, damage_it = DAMAGES[damage]
    damage_it(folder / name)
    before = _snapshot(tmp_path)
    result = run_cli(command, folder)  # the model path does not exist: refused before it is needed
    _assert_refused(result, str(folder), name if damage != "weights missing" else "sae_weights.safetensors")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing"])
def test_a_damaged_cache_chunk_stops_training_naming_it(tmp_path, run_cli, damage):
    from saecli.data.cache import write_cache

    g = torch.Generator().manual_seed(0)

    def chunks():
        for c in range(2):
            ids = torch.arange(c * 512, (c + 1) * 512)
            yield {f"acts.{HOOK}": torch.randn(512, 16, generator=g), "tokens": ids, "doc": ids // 64, "pos": ids % 64}

    cache = tmp_path / "cache"
    write_cache(cache, chunks(), hook_points=[HOOK], chunk_tokens=512)
    chunk = cache / "shard-000" / "chunk-000000.safetensors"
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-64])
    elif damage == "flipped byte":
        data = bytearray(chunk.read_bytes())
        data[-3] ^= 1
        chunk.write_bytes(bytes(data))
    else:
        chunk.unlink()
    out = tmp_path / "run"
    exp = write_toml(
        tmp_path / "exp.toml",
        textwrap.dedent(f'''
        [run]
        output_dir = "{out}"
        [activations]
        hook_points = ["{HOOK}"]
        cache_dir = "{cache}"
        source = "cache"
        batch_size = 128
        shuffle_buffer_tokens = 512
        [sae]
        d_sae = 32
        k = 4
        [trainer]
        total_training_tokens = 1024
        checkpoint_every_seconds = 0
        n_checkpoints = 0
        [store]
        backend = "none"
    '''),
    )
    before = _snapshot(cache)
    result = run_cli("train", exp)
    _assert_refused(result, str(chunk), "saecli check")
    assert _snapshot(cache) == before
    assert not (out / "sae_weights.safetensors").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "exp.toml", "run"}  # only the run folder is new
