"""Smoke tests of the benchmark CLI on tiny sizes (no download: generated or stdlib text)."""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import __main__ as cli
from benchmarks import core, data


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    """Shrink every task so the whole matrix runs in seconds."""
    monkeypatch.setitem(core.TASKS, "rosenbrock", core.Task(
        "rosenbrock", core._toy(core._rosenbrock, [-1.5, 2.0], 40, 1e9), "tiny", lr_scale=0.1))
    monkeypatch.setitem(core.TASKS, "quadratic", core.Task(
        "quadratic", core._toy(core._quadratic, [3.0] * 32, 40, 1e9, noise=0.1), "tiny"))
    monkeypatch.setitem(core.TASKS, "psi", core.Task(
        "psi", core._toy(core._psi, [-3.5, 2.0], 40, 1e9, noise=0.1), "tiny", lr_scale=0.1))
    text = ("to be or not to be that is the question " * 400).encode()
    chars = sorted(set(text.decode()))  # once: per character it cost seconds per test
    monkeypatch.setitem(core._CORPUS, "shakespeare", {
        "name": "generated", "sha256": data.sha256(text), "vocab": len(chars),
        "ids": core.torch.tensor([chars.index(c) for c in text.decode()])})


def _run(tmp_path, tasks, optims, extra=()):
    out = tmp_path / "results"
    cli.main(["run", "--task", tasks, "--optim", optims, "--seeds", "1", "--quick",
              "--lrs", "0.001,0.01", "--out", str(out), *extra])
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_every_task_end_to_end_with_json_and_plots(tmp_path, capsys):
    out, result = _run(tmp_path, "rosenbrock,quadratic,psi,digits,lm,throughput",
                       "adamw,associative,dm-muon")
    env = result["environment"]
    assert {"git_sha", "torch", "device", "dtype", "date"} <= env.keys()
    assert len(result["records"]) == 6 * 3
    for record in result["records"]:
        assert {"task", "optimizer", "metric", "best", "by_lr", "lrs", "seeds"} <= record.keys()
        best = record["best"]
        assert best["lr"] in record["lrs"]
        assert best["final_mean"] is not None and math.isfinite(best["final_mean"])
        assert all(v is None or math.isfinite(v) for v in best["curve"])
    digits = next(r for r in result["records"] if r["task"] == "digits")
    assert len(digits["best"]["extra"]["R"]) == 3 and "BWT" in digits["best"]["extra"]
    lm = next(r for r in result["records"] if r["task"] == "lm")
    assert lm["best"]["extra"]["corpus"] == "generated"
    assert "| task | optimizer |" in capsys.readouterr().out
    cli.main(["plot", str(out)])
    for name in ("rosenbrock", "quadratic", "psi", "digits", "lm", "throughput"):
        assert os.path.getsize(out / f"{name}.png") > 1000


def test_any_torch_optimizer_by_import_path(tmp_path):
    _, result = _run(tmp_path, "quadratic", "torch.optim.RMSprop")
    assert result["records"][0]["optimizer"] == "torch.optim.RMSprop"


@pytest.mark.parametrize("argv,message", [
    (["--task", "imagenet"], "Unknown task"),
    (["--optim", "lion"], "Unknown optimizer"),
    (["--optim", "torch.optim.NoSuch"], "Unknown optimizer"),
    (["--lrs", "0.1,-1"], "lr grid"),
    (["--lrs", "fast"], "lr grid"),
])
def test_bad_input_gives_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--task", "quadratic", "--optim", "adamw", *argv])
    assert message in capsys.readouterr().err


def test_corrupt_cached_corpus_is_fetched_again(tmp_path, capsys):
    good = b"the real corpus"
    monkey_sha = data.sha256(good)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shakespeare.txt").write_bytes(b"corrupted")
    fetched = []

    def fetch(directory):
        fetched.append(directory)
        return good

    original = data.SHAKESPEARE_SHA256
    data.SHAKESPEARE_SHA256 = monkey_sha
    try:
        assert data.shakespeare(str(cache), fetch) == good
    finally:
        data.SHAKESPEARE_SHA256 = original
    assert fetched and "fails its sha256 check" in capsys.readouterr().err
    assert (cache / "shakespeare.txt").read_bytes() == good


def test_a_wrong_download_is_refused_and_falls_back_with_a_message(tmp_path, capsys):
    used, text = data.load_corpus("shakespeare", str(tmp_path), fetch=lambda d: b"not it")
    assert used == "stdlib" and len(text) > 10_000
    assert "refusing" in capsys.readouterr().err
