#!/usr/bin/env bash
# Do the tests catch a broken drain? Builds the supervisor with one deliberate defect at a time,
# on a copy of the committed tree, and runs the tests that must catch it: each defect must make
# at least one test fail. Prints one line per defect; exits 1 if a defect went unnoticed.
#
#   scripts/sabotage.sh                 # every defect, a few minutes
#   scripts/sabotage.sh no-delay ...    # some of them
#
# Bounded: each test run has TEST_TIMEOUT seconds (default 300). Needs what scripts/test.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
scripts/install-deps.sh
export PATH="$PATH:/usr/sbin:/sbin"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$top/target}/sabotage"
timeout_s=${TEST_TIMEOUT:-300}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree=$work/tree
logs=$CARGO_TARGET_DIR/logs
mkdir -p "$tree" "$logs"
git archive --format=tar HEAD | tar -x -C "$tree"

wanted=("$@")
missed=0
# sabotage NAME FILE PERL-SUBSTITUTION TESTS: the substitution is applied to the whole file; the
# tests are cargo test targets of the supervisor's package.
sabotage() {
  local name=$1 file=$2 change=$3 tests=$4
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then
    return
  fi
  cp "$tree/$file" "$work/original"
  perl -0pi -e "$change" "$tree/$file"
  if cmp -s "$tree/$file" "$work/original"; then
    echo "sabotage $name: does not apply to $file any more: update scripts/sabotage.sh" >&2
    exit 2
  fi
  local log=$logs/$name.log rc=0
  # shellcheck disable=SC2086 # the test targets are words
  (cd "$tree" && timeout "$timeout_s" cargo test --locked --no-fail-fast -p nginx-graceful $tests) >"$log" 2>&1 || rc=$?
  if grep -q "could not compile" "$log"; then
    echo "sabotage $name: does not compile: update scripts/sabotage.sh" >&2
    sed -n '/^error/,+10p' "$log" >&2
    exit 2
  fi
  local failed
  failed=$(sed -nE 's/^test (.*) \.\.\. FAILED$/\1/p' "$log" | sort -u | tr '\n' ' ')
  if [ "$rc" -eq 0 ]; then
    echo "sabotage $name: NOT CAUGHT: every test of $tests passed"
    missed=$((missed + 1))
  elif [ "$rc" -eq 124 ]; then
    echo "sabotage $name: caught: the tests ran past ${timeout_s} s${failed:+; failed before that: $failed}"
  else
    echo "sabotage $name: caught by ${failed:-a failed run: $log}"
  fi
  cp "$work/original" "$tree/$file"
}

# The quit is nginx's fast shutdown: requests in flight are cut.
sabotage sigterm-for-sigquit src/drain/mod.rs \
  's/processes\.signal_masters\(Signal::SIGQUIT\)/processes.signal_masters(Signal::SIGTERM)/' \
  "--test drain --test prestop --test image --test controller"
# No propagation delay: connections routed to the pod meet closed listeners.
sabotage no-delay src/core/plan.rs \
  's/propagation_delay: args\.propagation_delay,/propagation_delay: Duration::ZERO,/' \
  "--test drain --test prestop"
# No drain flag: keep-alive clients are never told to close.
sabotage no-drain-flag src/os/drain_flag.rs \
  's/std::fs::rename\(&staging, &self\.path\)/std::fs::remove_file(&staging)/' \
  "--test drain --test prestop"
# No close window before a reload: keep-alive clients meet the old workers' close.
sabotage no-reload-close-window src/reload/mod.rs \
  's/\.filter\(\|_\| !settings\.close_window\.is_zero\(\)\)/.filter(|_| false)/' \
  "--test reload"
# Escalation at once: SIGTERM right after SIGQUIT.
sabotage escalation-at-once src/core/plan.rs \
  's/fast_shutdown_at: args\.grace_period - args\.safety_margin,/fast_shutdown_at: Duration::ZERO,/' \
  "--test drain"
# No wait for the workers: the supervisor exits while they still serve.
sabotage no-wait-for-workers src/drain/mod.rs \
  's/(async fn wait_for_all\([^{]*\{)/$1 return Waited::AllGone;/' \
  "--test drain --test prestop"

if [ "$missed" -gt 0 ]; then
  echo "$missed sabotage(s) went unnoticed" >&2
  exit 1
fi
