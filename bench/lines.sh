#!/usr/bin/env bash
# Audit budget: code lines in src/ — non-blank lines that are not only a
# comment, before each file's `#[cfg(test)]`. Prints per file and the total.
set -euo pipefail
cd "$(dirname "$0")/.."
total=0
for f in src/*.rs; do
  n=$(awk '/^#\[cfg\(test\)\]/{exit} { s=$0; sub(/^[ \t]+/, "", s); if (s != "" && s !~ /^\/\//) c++ } END { print c+0 }' "$f")
  printf '%6d %s\n' "$n" "$f"
  total=$((total + n))
done
printf '%6d total\n' "$total"
