"""Packed contexts made ahead of the model: in a thread (CPU runs), or in a child process (GPU runs).

On a GPU the forward pass is fast and its Python loop needs the GIL: reading text (parsing, `datasets`
rows) and packing in the same process would slow it down, so a child process does them and sends
numpy batches back through a pipe (`python -m saecli.data.producer`: no torch import, no re-import of
the caller's main module). The pipe's small buffer plus a short queue bound what is made ahead; the
child stops when its batches are no longer wanted, and by itself when its parent dies (broken pipe).
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from saecli.config.dataset import DatasetConfig
from saecli.errors import RunError, UsageError

if TYPE_CHECKING:
    import torch

    from saecli.data.tokens import Packer


_LEN = struct.Struct("<Q")


def use_process(device: torch.device | str) -> bool:
    """Tokenise in a child process for a GPU model (env SAECLI_TOKENIZE_PROCESS=1/0 forces either way)."""
    forced = os.environ.get("SAECLI_TOKENIZE_PROCESS")
    if forced is not None:
        return forced not in ("", "0", "false")
    return str(device).startswith("cuda")  # str(torch.device("cuda", 0)) == "cuda:0"


def context_batches(
    packer: Packer,
    dataset: DatasetConfig,
    shard: int,
    n_shards: int,
    batch_size: int,
    *,
    skip: int = 0,
    process: bool = False,
    ahead: int = 8,
):
    """An iterator of `Contexts` (with `close()`) over shard `shard` of the text, after `skip` windows."""
    from saecli.data.prefetch import Prefetch

    if process:
        return _ProcessBatches(packer, (packer.windows_of, dataset, shard, n_shards, batch_size, skip), ahead)
    from saecli.data.text import iter_documents

    docs = iter_documents(dataset, shard, n_shards)
    return Prefetch(packer.contexts(docs, batch_size, skip=skip), size=ahead, name="saecli-tokenise")


class _ProcessBatches(Iterator[Any]):
    def __init__(self, packer: Packer, job: tuple, ahead: int):
        from saecli.data.prefetch import Prefetch

        self.packer = packer
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the saecli package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "saecli.data.producer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        self._proc.stdin.close()
        self._messages = Prefetch(_read_messages(self._proc.stdout), size=ahead, name="saecli-tokenise-pipe")
        self._done = False

    def __next__(self):
        if self._done:
            raise StopIteration
        item = next(self._messages, None)
        if item is None:
            self._done = True
            code = self._proc.wait(timeout=30)
            raise RunError(f"the tokeniser process ended unexpectedly (exit code {code})")
        kind = item[0]
        if kind == "batch":
            return self.packer.to_contexts(item[1])
        self._done = True
        self._proc.wait(timeout=30)
        if kind == "usage":
            raise UsageError(item[1])
        if kind == "error":
            raise RunError(f"reading or tokenising the text failed: {item[1]}")
        raise StopIteration  # "end"

    def close(self) -> None:
        self._done = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._messages.close()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __del__(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()


def _read_messages(stream: IO[bytes]) -> Iterator[tuple]:
    while True:
        head = stream.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        (size,) = _LEN.unpack(head)
        body = stream.read(size)
        if len(body) < size:
            return
        yield pickle.loads(body)


def _child() -> None:
    """Entry of `python -m saecli.data.producer`: the job from stdin, messages to stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the message stream
    windows_of, dataset, shard, n_shards, batch_size, skip = pickle.load(sys.stdin.buffer)

    def send(item: tuple) -> None:
        body = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_LEN.pack(len(body)))
        out.write(body)

    from saecli.data.text import iter_documents

    try:
        for batch in windows_of.batches(iter_documents(dataset, shard, n_shards), batch_size, skip):
            send(("batch", batch))
        send(("end",))
    except (BrokenPipeError, KeyboardInterrupt):
        return  # the parent stopped listening
    except UsageError as exc:
        send(("usage", str(exc)))
    except BaseException as exc:  # reported to the parent, which raises
        send(("error", f"{type(exc).__name__}: {exc}"))
    try:
        out.flush()
    except BrokenPipeError:
        pass


if __name__ == "__main__":
    _child()
