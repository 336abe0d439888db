#!/usr/bin/env bash
# Runs keyhole's fuzz targets for a bounded time each (CI and local use).
#
#   bash fuzz/run.sh                  # every target, FUZZ_SECONDS (60) each
#   FUZZ_SECONDS=600 bash fuzz/run.sh request_head
#   FUZZ_SANITIZER=none bash fuzz/run.sh   # quicker build and runs
#
# Each target starts from a scratch copy of its committed corpus, so runs
# never modify fuzz/corpus. A crash (or leak, timeout, OOM) fails the script
# and prints the reproducer path and the command that replays it.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
# keyhole forbids unsafe code, so `none` (a faster build and faster runs)
# loses little; AddressSanitizer stays the default for the unsafe in deps.
sanitizer="${FUZZ_SANITIZER:-address}"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(request_head chunked_body response_head route_rewrite connection json_escape connect_response usage_scan)
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
if rustup toolchain list 2>/dev/null | grep -q nightly; then
  fuzz=(cargo +nightly fuzz)
else
  # cargo-fuzz needs -Z flags (sanitizers); stable accepts them this way.
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

scratch="corpus-run"
mkdir -p artifacts
status=0
for target in "${targets[@]}"; do
  echo "== fuzz $target for ${seconds}s"
  rm -rf "${scratch:?}/$target"
  mkdir -p "$scratch/$target"
  cp -R "corpus/$target/." "$scratch/$target/"
  log="artifacts/$target.log"
  dict="http.dict"
  if [ -f "$target.dict" ]; then dict="$target.dict"; fi
  set +e
  "${fuzz[@]}" run --sanitizer "$sanitizer" "$target" "$scratch/$target" -- \
    -max_total_time="$seconds" -dict="$dict" -max_len=65536 -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    tee "$log" | grep --line-buffered -E '^#[0-9]+[[:space:]]+(INITED|DONE|pulse)'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ] || ! grep -qE '^Done [0-9]+ runs' "$log"; then
    status=1
    echo "!! $target FAILED (exit $rc); full log: fuzz/$log"
    grep -E 'panicked at|^SUMMARY|^==[0-9]+== ?ERROR' "$log" | head -n 20 || true
    reproducer=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    if [ -n "$reproducer" ]; then
      echo "!! reproducer: $reproducer"
      echo "!! replay:     (cd fuzz && ${fuzz[*]} run $target $reproducer)"
      echo "!! minimize:   (cd fuzz && ${fuzz[*]} tmin $target $reproducer)"
    fi
  else
    grep -E '^Done [0-9]+ runs|^stat::number_of_executed_units' "$log" || true
    grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true
  fi
done
exit "$status"
