#!/usr/bin/env bash
# The README's first command as a new user runs it: a fresh clone of this checkout's HEAD, an empty HOME (no pip or
# model cache), each part of the command timed. Usage: bash bench/first_command.sh [WORKDIR]  (default: a temp dir)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
rm -rf "$work/clone" "$work/home" && mkdir -p "$work/home"
git clone -q "$repo" "$work/clone" && cd "$work/clone"
export HOME="$work/home"
cmd=$(awk '/^```bash$/{getline; print; exit}' README.md)
echo "commit $(git rev-parse --short HEAD); command: $cmd"
echo "output of the command: $work/out.txt"
while IFS= read -r step; do  # the command's parts, split at ' && ', run in one shell so the venv stays active
  echo "$step"
done < <(echo "$cmd" | sed 's/ && /\n/g') > "$work/steps.txt"
script=""
while IFS= read -r step; do
  script+="s=\$(date +%s.%N); $step >> '$work/out.txt' 2>&1 || exit 1; "
  script+="printf '%6.0f s  %s\n' \"\$(echo \"\$(date +%s.%N) - \$s\" | bc)\" '$step'; "
done < "$work/steps.txt"
start=$(date +%s)
bash -c "$script"
echo "total $(( $(date +%s) - start )) s"
