"""Record the golden trajectories (see trajectories.py).

    python tests/golden/record.py                 # from the code on the path (this checkout)
    python tests/golden/record.py --commit 39d4756 # from the package at that commit
    python tests/golden/record.py --add-missing    # only cases the files lack (new settings)
    python tests/golden/record.py --commit 39d4756 --this-cpu \
        --like tests/golden/trajectories.json.gz   # a recording for this CPU (then:)
    python tests/golden/record.py --add-missing --this-cpu

``--this-cpu`` writes the recording to ``cpus/<hash of this CPU's ISA flags>/`` instead, which
tests/test_golden.py replays on machines with the same flags (a CPU whose kernels round
differently from the first recording's, though torch names the same capability). ``--like
FILE`` records from the commit only the cases FILE recorded from it (not those it lists as
added later), so that ``--add-missing`` then records the others from the current code, as FILE
did from the commits they were added at (the current code replays those bit for bit where FILE
was recorded).

``--commit`` checks that commit out in a temporary git worktree and imports ``deepmomentum``
from it, with this checkout's case definitions and registry: the way to regenerate the
pre-refactor trajectories on another machine (then run tests/test_golden.py there). It also
writes ``checkpoints.pt``: each registry setting's ``state_dict`` after 10 steps, saved by that
code, which tests/test_golden.py loads into the current code and continues.

``--add-missing`` keeps every recorded case and checkpoint as it is and records, from the code
on the path, only the cases the files do not hold yet (a registry setting added since), listing
them under ``"added"`` with the commit they were recorded at.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", help="record from the package at this git commit")
    parser.add_argument("--out", type=Path, default=HERE / "trajectories.json.gz")
    parser.add_argument("--add-missing", action="store_true",
                        help="record only the cases the files lack; keep the others")
    parser.add_argument("--like", type=Path, default=None,
                        help="record from the commit only the cases this file recorded from it")
    parser.add_argument("--this-cpu", action="store_true",
                        help="write to cpus/<this CPU's flags>/ (see trajectories.cpu_flags)")
    args = parser.parse_args()
    if args.this_cpu:
        sys.path.insert(0, str(HERE))
        import trajectories

        args.out = trajectories.cpu_dir(trajectories.cpu_flags()) / "trajectories.json.gz"
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.commit:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                            args.commit], check=True, capture_output=True)
            try:
                env = {**os.environ, "DEEPMOMENTUM_GOLDEN_SOURCE": str(tree),
                       "DEEPMOMENTUM_GOLDEN_COMMIT": args.commit}
                like = ["--like", str(args.like.resolve())] if args.like else []
                subprocess.run([sys.executable, __file__, "--out", str(args.out), *like],
                               env=env, check=True, cwd=ROOT)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=True)
        return
    source = os.environ.get("DEEPMOMENTUM_GOLDEN_SOURCE")
    if source:
        sys.path.insert(0, source)
    if not os.environ.get("TRITON_INTERPRET"):
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py
    sys.path.insert(0, str(HERE))
    import trajectories
    import deepmomentum

    assert source is None or deepmomentum.__file__.startswith(source), deepmomentum.__file__
    commit = os.environ.get("DEEPMOMENTUM_GOLDEN_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip()
    checkpoint_file = args.out.parent / trajectories.CHECKPOINTS.name
    if args.add_missing:
        if args.out.resolve() != trajectories.GOLDEN.resolve():
            raise SystemExit(f"this CPU replays {trajectories.GOLDEN}, not {args.out}: cases "
                             "recorded here belong there (--this-cpu where this CPU has its "
                             "own recording)")
        with gzip.open(args.out, "rt") as f:
            out = json.load(f)
        saved = torch.load(checkpoint_file, weights_only=False)
        if out["environment"] != trajectories.environment():
            raise SystemExit(f"the recorded cases come from {out['environment']}, this is "
                             f"{trajectories.environment()}: record them all here instead")
    else:
        out = {"environment": trajectories.environment(), "commit": commit, "cases": {},
               "cpu_flags": trajectories.cpu_flags()}
        saved = {"commit": commit, "checkpoints": {}}
    only = None
    if args.like:  # the cases that file recorded from its commit
        with gzip.open(args.like, "rt") as f:
            like = json.load(f)
        later = {c for cases in like.get("added", {}).values() for c in cases}
        only = set(like["cases"]) - later
    added = []
    for case_id, info, variant, impl, dtype in trajectories.cases():
        if case_id in out["cases"] or case_id in out.get("absent", ()):
            continue
        if only is not None and case_id not in only:
            continue
        result = trajectories.run_case(info, variant, impl, dtype)
        if result is not None:
            out["cases"][case_id] = result
            added.append(case_id)
        elif args.add_missing:  # no such implementation: remembered, not run again
            out.setdefault("absent", []).append(case_id)
    if args.add_missing and added:
        out.setdefault("added", {}).setdefault(commit, []).extend(added)
    with gzip.open(args.out, "wt") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"{len(added)} cases from {commit} -> {args.out} ({len(out['cases'])} in all)")
    checkpoints = saved["checkpoints"]
    for case_id, info, variant, _, dtype in trajectories.checkpoint_cases():
        if case_id not in checkpoints and (only is None or case_id in only):
            try:
                checkpoints[case_id] = trajectories.save_checkpoint(info, variant, dtype)
            except TypeError:  # an older commit without this setting's option: --add-missing
                if not source:
                    raise
    torch.save(saved, checkpoint_file)
    print(f"{len(checkpoints)} checkpoints after {trajectories.CHECKPOINT_AT} steps -> "
          f"{args.out.parent / trajectories.CHECKPOINTS.name}")


if __name__ == "__main__":
    main()
