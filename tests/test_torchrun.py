"""The HOPE example and the benchmarks' LM task launched by torchrun on 2 CPU ranks (gloo,
FSDP2) follow the one-process run of the same script, within float32 rounding.

Each case runs ``python -m torch.distributed.run --standalone --nproc-per-node 2 ...`` in a
subprocess (tiny sizes, a few steps, no download: the corpus is the interpreter's standard
library source) and the one-process run in this process; the global batches are the same, so
the loss curves agree up to the rounding of FSDP's averaged gradients.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def close(a: list[float], b: list[float], rtol: float) -> float:
    """The largest relative difference of two loss curves, asserted ≤ ``rtol``."""
    assert len(a) == len(b) and all(math.isfinite(x) for x in a + b)
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst <= rtol, (worst, a, b)
    return worst


# --- examples/hope/train.py -------------------------------------------------------------------

HOPE = ["--arch", "hope", "--size", "micro", "--corpus", "stdlib", "--device", "cpu",
        "--quiet", "--steps", "6"]


def _one_process(out, optim: str) -> dict:
    from examples.hope import train

    train.main([*HOPE, "--optim", optim, "--out", str(out)])
    with open(out / "metrics.json") as f:
        return json.load(f)


def _compare_models(a, b, rtol: float) -> None:
    """The two runs' trained models (a one-process checkpoint.pt, a DCP checkpoint/)."""
    from examples.hope import train

    one, two = train.load(str(a)).state_dict(), train.load(str(b)).state_dict()
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=rtol, atol=rtol, msg=name)


def test_hope_train_on_two_ranks_follows_one_process(tmp_path):
    """PreconditionedMomentum (HOPE's CMS levels at periods 1 and 2): the 2-rank run's loss
    curve, validation and trained weights are the one-process run's."""
    one = _one_process(tmp_path / "one", "PreconditionedMomentum")
    torchrun("examples/hope/train.py", *HOPE, "--optim", "PreconditionedMomentum",
             "--out", str(tmp_path / "two"), "--fsdp")
    with open(tmp_path / "two" / "metrics.json") as f:
        two = json.load(f)
    assert two["fsdp_world_size"] == 2 and not two["partial"]
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint", "metrics.json"]
    close(one["train_loss"], two["train_loss"], 1e-4)
    close([v["bits_per_byte"] for v in one["val"]], [v["bits_per_byte"] for v in two["val"]],
          1e-4)
    _compare_models(tmp_path / "one", tmp_path / "two", 1e-4)


def test_hope_muon_on_two_ranks_stopped_and_resumed_on_one_follows_one_process(
        tmp_path, monkeypatch):
    """Muon (Newton–Schulz on one owner rank per matrix, AdamW for the rest), stopped after 3
    of 6 steps with a DCP checkpoint written by 2 ranks, resumed on 1 rank (in this process:
    a gloo group of one; DCP reshards): the one-process run's curve."""
    one = _one_process(tmp_path / "one", "Muon")
    run = [*HOPE, "--optim", "Muon", "--out", str(tmp_path / "two"), "--fsdp", "--ckpt-every",
           "3"]
    cut = torchrun("examples/hope/train.py", *run, "--stop-after", "3")
    assert "stopped at step 3 of 6" in cut.stderr
    with open(tmp_path / "two" / "metrics.json") as f:
        partial = json.load(f)
    assert partial["partial"] is True and len(partial["train_loss"]) == 3
    from examples.hope import train

    # the one-process script refuses to "resume" a distributed run (it would start over)
    with pytest.raises(ValueError, match="distributed checkpoint"):
        train.main([*HOPE, "--optim", "Muon", "--out", str(tmp_path / "two"), "--resume"])
    _one_rank(monkeypatch)
    train.main([*run, "--resume"])
    assert not dist.is_initialized()
    with open(tmp_path / "two" / "metrics.json") as f:
        two = json.load(f)
    assert not two["partial"] and two["fsdp_world_size"] == 1 and len(two["train_loss"]) == 6
    close(one["train_loss"], two["train_loss"], 1e-4)
    _compare_models(tmp_path / "one", tmp_path / "two", 1e-3)


def _one_rank(monkeypatch) -> None:
    """torchrun's environment for a world of one in this process (train.main joins and leaves
    the gloo group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)


def test_hope_fsdp_resume_of_a_torch_optimizer_is_exact(tmp_path, monkeypatch):
    """torch.AdamW under MultiFrequency with every group at period 1 (the Transformer++):
    MultiFrequency's own state is empty, so set_state_dict's lr-0 initializing step runs again
    after dcp.load — train.py hands it a copy of the loaded state, and the resumed run is the
    straight one bit for bit (world of one, in this process)."""
    from examples.hope import train

    run = [*HOPE, "--arch", "transformer", "--optim", "torch.AdamW", "--fsdp", "--ckpt-every",
           "3"]
    _one_rank(monkeypatch)
    train.main([*run, "--out", str(tmp_path / "straight")])
    _one_rank(monkeypatch)
    train.main([*run, "--out", str(tmp_path / "cut"), "--stop-after", "3"])
    _one_rank(monkeypatch)
    train.main([*run, "--out", str(tmp_path / "cut"), "--resume"])
    runs = []
    for name in ("straight", "cut"):
        with open(tmp_path / name / "metrics.json") as f:
            runs.append(json.load(f))
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["val"] == runs[1]["val"]
    _compare_models(tmp_path / "straight", tmp_path / "cut", 0.0)


def test_hope_train_refuses_several_ranks_without_fsdp(monkeypatch, capsys, tmp_path):
    from examples.hope import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.parse_args([*HOPE, "--out", str(tmp_path)])
    assert "without --fsdp" in capsys.readouterr().err


# --- benchmarks.lm_distributed ----------------------------------------------------------------

LM = ["--quick", "--steps", "5", "--corpus", "stdlib", "--device", "cpu"]


@pytest.mark.parametrize("optim, rtol", [("associative", 1e-5), ("dm-muon", 1e-4)])
def test_benchmark_lm_on_two_ranks_follows_one_process(tmp_path, monkeypatch, optim, rtol):
    from benchmarks import core, lm_distributed

    monkeypatch.setitem(core.LM_SIZES, True, (5, *core.LM_SIZES[True][1:]))  # _lm: 5 steps
    one = lm_distributed.main(["--optim", optim, *LM, "--out", str(tmp_path / "one.json")])
    assert one["world_size"] == 1 and not one["fsdp"]
    # in one process it is the benchmark's own LM task, step for step
    spec = core.optimizer_spec(optim)
    middle = spec.lrs[len(spec.lrs) // 2]  # lm_distributed's default lr
    task = core._lm(spec, middle, 0, True, "stdlib").losses
    assert one["losses"] == task[:5]
    torchrun("-m", "benchmarks.lm_distributed", "--optim", optim, *LM,
             "--out", str(tmp_path / "two.json"))
    with open(tmp_path / "two.json") as f:
        two = json.load(f)
    assert two["world_size"] == 2 and two["fsdp"] and len(two["losses"]) == 5
    close(one["losses"], two["losses"], rtol)
    assert math.isclose(one["val_bits_per_char"], two["val_bits_per_char"], rel_tol=rtol)
