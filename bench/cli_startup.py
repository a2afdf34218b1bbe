"""How fast the command line answers when it loads no model: --help, the listings, argument errors.

    python bench/cli_startup.py --trials 5

Runs each command in a fresh Python process (``python -m lmshrink.cli ...``, the same interpreter and PYTHONPATH as
this script), ``--trials`` times, and prints the median and the slowest wall time, the exit code, and whether the
process imported torch or transformers (read from ``sys.modules`` at exit). For reference it also times a process
that only imports torch and transformers, the cost every command would pay if the CLI imported them up front.
Wall times on a shared machine are noisy: read them beside the reference row of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# each command answers without loading a model: listings, help, and arguments refused before anything loads
COMMANDS = [
    ["--help"],
    ["models"],
    ["recipes"],
    ["recipes", "--show", "w4g128"],
    ["compress", "--help"],
    ["evaluate", "--help"],
    ["compress", "smollm2-135m", "--recipe", "w4g128", "-o", "{tmp}/out", "--nsamples", "0"],
    ["compress", "smollm2-135m", "--recipe", "w4g128", "-o", "{tmp}/out", "--seed", "-1"],
    ["compress", "smollm2-135m", "--recipe", "no-such-preset", "-o", "{tmp}/out"],
    ["compress", "./no/such/model", "--recipe", "w4g128", "-o", "{tmp}/out"],
    ["evaluate", "smollm2-135m", "--limit", "0"],
    ["evaluate", "smollm2-135m", "--ppl", "no-such-set"],
    ["evaluate", "no-such-org/no-such-model"],
    ["bench", "smollm2-135m", "--trials", "0"],
]

# the process reports what it imported as its last stderr line
_RUNNER = ("import sys\nfrom lmshrink.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n"
           "    code = exc.code or 0\nheavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
           "sys.stderr.write('\\nIMPORTED ' + (','.join(heavy) or '-') + '\\n')\nsys.exit(code)\n")


def _run(argv: list[str]) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    lines = proc.stderr.strip().splitlines()
    imported = lines[-1].removeprefix("IMPORTED ") if lines and lines[-1].startswith("IMPORTED ") else "?"
    return seconds, proc.returncode, imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="runs of each command (default: 5)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for command in COMMANDS:
            argv = [part.replace("{tmp}", tmp) for part in command]
            runs = [_run(argv) for _ in range(args.trials)]
            times = [seconds for seconds, _, _ in runs]
            rows.append((" ".join(command).replace("{tmp}", "TMP"), statistics.median(times), max(times),
                         runs[-1][1], runs[-1][2]))
        reference = []
        for _ in range(args.trials):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)
            reference.append(time.perf_counter() - started)
    width = max(len(row[0]) for row in rows)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"{args.trials} trials each, lmshrink from {Path(__import__('lmshrink').__file__).parent}")
    print(f"{'command':<{width}}  median s  max s  exit  imported")
    for command, median, slowest, code, imported in rows:
        print(f"{command:<{width}}  {median:8.2f}  {slowest:5.2f}  {code:4d}  {imported}")
    label = '(reference) python -c "import torch, transformers"'
    print(f"{label:<{width}}  {statistics.median(reference):8.2f}  {max(reference):5.2f}")


if __name__ == "__main__":
    main()
