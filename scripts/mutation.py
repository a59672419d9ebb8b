"""Mutation testing of the core maths (`make mutation`; not in CI): mutmut changes one operator, constant or
call at a time in the functions below and runs, for each mutant, the tests of `[tool.mutmut]` (pyproject.toml)
that call the mutated function; a mutant no test notices "survives". One module at a time, one process.

    python scripts/mutation.py                     # every module, then the summary
    python scripts/mutation.py training/losses.py  # one module (results of the others are kept)
    python scripts/mutation.py --summary           # the summary of the last run only

Prints killed / survived / score per module (score = killed or timed out / mutants) and the survivors; see one
with `mutmut show <name>`. docs/testing.md records the scores and why each survivor is equivalent or harmless.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# module as reported -> (its file, the mutant names in scope: mutmut names a method xǁClassǁmethod__mutmut_<n>)
SCOPE = {
    "training/losses.py": ("distilbert_cli/training/losses.py", ["distilbert_cli.training.losses.*"]),
    "training/masking.py": ("distilbert_cli/training/masking.py", ["distilbert_cli.training.masking.*"]),
    "models/student.py": ("distilbert_cli/models/student.py", ["distilbert_cli.models.student.*"]),
    "tasks/glue.py compute_metrics": ("distilbert_cli/tasks/glue.py",
                                      ["distilbert_cli.tasks.glue.xǁGlueTaskǁcompute_metrics__mutmut_*"]),
    "tasks/base.py score, metric_key": ("distilbert_cli/tasks/base.py",
                                        ["distilbert_cli.tasks.base.xǁTaskǁscore__mutmut_*",
                                         "distilbert_cli.tasks.base.xǁTaskǁmetric_key__mutmut_*"]),
    "tasks/results.py paired_bootstrap": ("distilbert_cli/tasks/results.py",
                                          ["distilbert_cli.tasks.results.x_paired_bootstrap__mutmut_*",
                                           "distilbert_cli.tasks.results.x_percentile_bootstrap__mutmut_*",
                                           "distilbert_cli.tasks.results.x_bootstrap_mean__mutmut_*"]),
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# mutmut's exit codes (mutmut.stats): 1 and 3 a failing test, 0 every test passed, None not run yet
KILLED, SURVIVED, NOT_CHECKED = {1, 3}, {0}, {None}
TIMEOUT = {36, 24, -24, 152, 255}


def statuses(path: str, globs: list[str]) -> dict[str, int | None]:
    meta = Path("mutants") / f"{path}.meta"
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    return {name: code for name, code in codes.items() if any(fnmatch.fnmatchcase(name, g) for g in globs)}


def summary() -> bool:
    """Print the table and the survivors; False when a mutant in scope was not checked."""
    columns = ("mutants", "killed", "timeout", "survived", "other", "score")
    print(f"\n{'module':36s} " + " ".join(f"{name:>8s}" for name in columns))
    survivors, complete = [], True
    for module, (path, globs) in SCOPE.items():
        codes = statuses(path, globs)
        killed = sum(code in KILLED for code in codes.values())
        timeout = sum(code in TIMEOUT for code in codes.values())
        survived = [name for name, code in codes.items() if code in SURVIVED]
        other = len(codes) - killed - timeout - len(survived)
        complete &= bool(codes) and not any(code in NOT_CHECKED for code in codes.values())
        score = 100 * (killed + timeout) / len(codes) if codes else 0.0
        counts = (len(codes), killed, timeout, len(survived), other)
        print(f"{module:36s} " + " ".join(f"{n:8d}" for n in counts) + f" {score:7.1f}%")
        survivors += survived + [f"{name} (exit code {code})" for name, code in codes.items()
                                 if code not in KILLED | TIMEOUT | SURVIVED]
    print("\nnot killed:" if survivors else "\nevery mutant in scope was killed")
    for name in survivors:
        print(f"  {name}")
    return complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", choices=[[], *SCOPE], metavar="MODULE",
                        help=f"run only these (default: all of {', '.join(SCOPE)})")
    parser.add_argument("--summary", action="store_true", help="only print the summary of the last run")
    args = parser.parse_args()
    if not args.summary:
        Path("mutants").mkdir(exist_ok=True)
        for module in args.modules or SCOPE:
            globs = SCOPE[module][1]
            start = time.monotonic()
            with open(Path("mutants") / f"log-{module.split()[0].replace('/', '-')}.txt", "w") as log:
                subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "1", *globs], stdout=log,
                               stderr=subprocess.STDOUT, check=True, env={**os.environ, **ONE_THREAD})
            print(f"{module}: {time.monotonic() - start:.0f} s", flush=True)
    if not summary():
        sys.exit("some mutants in scope were not checked (see mutants/log-*.txt)")


if __name__ == "__main__":
    main()
