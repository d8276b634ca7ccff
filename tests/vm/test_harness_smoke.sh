#!/usr/bin/env bash
# tests/vm/test_harness_smoke.sh -- self-test of tests/vm/run-in-vm.sh (no Python in the guest).
# Boots the VM three times (~3 s each under TCG):
#   1. exit status and stdout/stderr pass through, --env and --rw work;
#   2. cgroup v2 memory controller: a child group with memory.max, a hog in
#      it is OOM-killed, memory.events shows oom_kill 1;
#   3. a command that is not found gives 127, not 125.
# Exit 0 if all pass.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
VM=$HERE/run-in-vm.sh
fails=0
check() {   # check NAME EXPECTED ACTUAL
  if [[ $2 == "$3" ]]; then echo "ok   $1"; else echo "FAIL $1: expected [$2], got [$3]"; fails=$((fails + 1)); fi
}

RW=$(mktemp -d "$HOME/.oomguard-vm-smoke.XXXXXX")   # not under /tmp: the guest's /tmp is its own
trap 'rm -rf "$RW"' EXIT

out=$(SMOKE_VAR='a b $c' OOMGUARD_VM_QUIET=1 "$VM" --rw "$RW" --env SMOKE_VAR -- \
      bash -c 'echo "$SMOKE_VAR" > "$0/from-guest"; echo out; echo err >&2; exit 7' "$RW" 2>"$RW/err")
check "exit status passes through" 7 "$?"
check "stdout streams back" out "$out"
check "stderr streams back" err "$(cat "$RW/err")"
check "--env and --rw" 'a b $c' "$(cat "$RW/from-guest" 2>/dev/null)"

# shellcheck disable=SC2016
out=$(OOMGUARD_VM_QUIET=1 "$VM" bash -c '
  cg=/sys/fs/cgroup
  grep -qw memory $cg/cgroup.controllers && echo controllers:memory
  grep -qw memory $cg/cgroup.subtree_control && echo subtree:memory
  [ -r /proc/pressure/memory ] && echo psi
  mkdir $cg/smoke && echo +memory > $cg/smoke/cgroup.subtree_control && mkdir $cg/smoke/hog
  echo 16M > $cg/smoke/hog/memory.max
  { sh -c "echo \$\$ > $cg/smoke/hog/cgroup.procs; exec tail /dev/zero"; } 2>/dev/null && echo hog-survived
  grep "^oom_kill " $cg/smoke/hog/memory.events')
check "v2 memory controller, PSI, OOM kill in a child group" \
  "controllers:memory subtree:memory psi oom_kill 1" "$(echo $out)"

OOMGUARD_VM_QUIET=1 "$VM" /nonexistent/command 2>/dev/null
check "missing command gives 127" 127 "$?"

((fails == 0)) && echo "all passed" || echo "$fails failed"
((fails == 0))
