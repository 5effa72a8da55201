"""The whole autointerp loop against real LLM backends, offline: transformers' own OpenAI-compatible
server (`transformers serve`, started here on loopback) and the in-process transformers backend, both
on the tiny random model. Random weights answer noise, so this checks the plumbing (requests, usage,
files, store, resume), not the explanations; test_autointerp.py checks the scores on scripted answers.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_autointerp import experiment, toy_analysis

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A copy of experiments/tiny/model with a chat template (it has none)."""
    src = REPO / "experiments" / "tiny" / "model"
    if not (src / "config.json").exists():
        pytest.skip("experiments/tiny/model is missing: python -m saecli.lm.tiny experiments/tiny/model")
    dst = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(chat_model, tmp_path_factory):
    exe = Path(sys.executable).with_name("transformers")
    pytest.importorskip("fastapi")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", str(chat_model)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"transformers serve did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


SMALL = "features = [0, 1, 2]\nexamples_per_prompt = 10\nmax_answer_retries = 0"


def check_run(tmp_path: Path, out: str) -> list[dict]:
    folder = tmp_path / "sae" / "analysis" / "default" / "autointerp" / "default"
    recs = [json.loads((folder / "features" / f"{i}.json").read_text()) for i in (0, 1, 2)]
    for r in recs:
        assert r["usage"]["requests"] >= 1 and r["usage"]["prompt_tokens"] > 0  # tokens as counted by the model
        assert r["explainer"]["attempts"] == 1
    assert json.loads((folder / "summary.json").read_text())["features"] == 3
    assert "tokens in / out" in out
    return recs


def test_loop_against_transformers_serve(served, chat_model, tmp_path, run_cli):
    from saecli.config.run import StoreConfig
    from saecli.store import open_store

    toy_analysis(tmp_path / "sae")
    db = tmp_path / "s.db"
    with open_store(StoreConfig(backend="sqlite", path=str(db))) as store:
        store.put_sae("toy", "default", path=str(tmp_path / "sae"), cfg={"kind": "sae"})
    path = experiment(tmp_path, served, SMALL, store=f'backend = "sqlite"\npath = "{db}"')
    path.write_text(path.read_text().replace('model = "fake-model"', f'model = "{chat_model}"\nmax_tokens = 8'))
    res = run_cli("autointerp", path)
    assert res.exit_code == 0, res.output
    recs = check_run(tmp_path, res.output)
    with open_store(StoreConfig(backend="sqlite", path=str(db))) as store:
        interp = store.get_feature("toy", "default", 0)["interpretation"]
    assert interp["model"] == str(chat_model) and interp["explanation"] == recs[0]["explanation"]
    res = run_cli("autointerp", path)  # everything finished: resumes to nothing
    assert res.exit_code == 0 and "3 already finished, 0 to do" in " ".join(res.output.split())


def test_loop_in_process(chat_model, tmp_path, run_cli, one_thread):
    toy_analysis(tmp_path / "sae")
    path = experiment(tmp_path, "unused", SMALL)
    path.write_text(
        path.read_text().replace(
            'model = "fake-model"',
            f'backend = "local"\nmodel = "{chat_model}"\ndevice = "cpu"\nmax_tokens = 8\nbatch_size = 4',
        )
    )
    res = run_cli("autointerp", path)
    assert res.exit_code == 0, res.output
    check_run(tmp_path, res.output)


@pytest.mark.slow
def test_tiny_example_runs_as_written_after_train_and_analyze(tmp_path, cli):
    out = tmp_path / "topk"
    assert cli("-q", "train", "experiments/tiny/train.toml", "--set", f"run.output_dir={out}").exit_code == 0
    assert cli("-q", "analyze", out, "--set", "analyze.total_analyzing_tokens=20000").exit_code == 0
    res = cli("autointerp", "experiments/tiny/autointerp.toml", "--set", f"run.output_dir={out}")
    assert res.exit_code == 0, res.output
    assert len(list((out / "analysis/default/autointerp/tiny-local/features").glob("*.json"))) == 4
