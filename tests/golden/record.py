"""Record the golden trajectories (see trajectories.py).

    python tests/golden/record.py                 # from the code on the path (this checkout)
    python tests/golden/record.py --commit 39d4756 # from the package at that commit

``--commit`` checks that commit out in a temporary git worktree and imports ``deepmomentum``
from it, with this checkout's case definitions and registry: the way to regenerate the
pre-refactor trajectories on another machine (then run tests/test_golden.py there). It also
writes ``checkpoints.pt``: each registry setting's ``state_dict`` after 10 steps, saved by that
code, which tests/test_golden.py loads into the current code and continues.
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
    args = parser.parse_args()
    if args.commit:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                            args.commit], check=True, capture_output=True)
            try:
                env = {**os.environ, "DEEPMOMENTUM_GOLDEN_SOURCE": str(tree),
                       "DEEPMOMENTUM_GOLDEN_COMMIT": args.commit}
                subprocess.run([sys.executable, __file__, "--out", str(args.out)], env=env,
                               check=True)
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
    out = {"environment": trajectories.environment(), "commit": commit, "cases": {}}
    for case_id, info, variant, impl, dtype in trajectories.cases():
        result = trajectories.run_case(info, variant, impl, dtype)
        if result is not None:
            out["cases"][case_id] = result
    with gzip.open(args.out, "wt") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"{len(out['cases'])} cases from {commit} -> {args.out}")
    checkpoints = {case_id: trajectories.save_checkpoint(info, variant, dtype)
                   for case_id, info, variant, _, dtype in trajectories.checkpoint_cases()}
    torch.save({"commit": commit, "checkpoints": checkpoints}, args.out.parent /
               trajectories.CHECKPOINTS.name)
    print(f"{len(checkpoints)} checkpoints after {trajectories.CHECKPOINT_AT} steps -> "
          f"{args.out.parent / trajectories.CHECKPOINTS.name}")


if __name__ == "__main__":
    main()
