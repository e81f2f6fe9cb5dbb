#!/usr/bin/env bash
# Stops the CI SLURM that .ci/slurm/start.sh started (by pid file); --purge also removes its state.
# .ci/slurm/stop.sh - stop the single-host CI SLURM cluster started by start.sh.
# Idempotent: safe to run when nothing is running.
#   --purge   also delete slurm state, spool dirs, logs and the generated config.
# Only processes recorded in the daemons' own pid files are signalled (plus any
# slurmstepd still left after all jobs were cancelled; those are children of our slurmd).
set -uo pipefail

PURGE=0
[[ "${1:-}" == "--purge" ]] && PURGE=1
[[ $EUID -eq 0 ]] || { echo ".ci/slurm/stop.sh: must run as root" >&2; exit 1; }

log() { echo "[stop_slurm $(date +%T)] $*"; }

# stop_pid PID COMM TIMEOUT_S : SIGTERM, wait up to TIMEOUT_S, then SIGKILL
stop_pid() {
  local pid=$1 name=$2 t=${3:-15}
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$name"* ]] || { log "pid $pid is not $name; leaving it alone"; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < t * 10; i++)); do kill -0 "$pid" 2>/dev/null || { log "stopped $name (pid $pid)"; return 0; }; sleep 0.1; done
  log "$name (pid $pid) ignored SIGTERM for ${t}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null; sleep 0.5
}

# 1. cancel all jobs while slurmctld is still up, and wait for them to leave the queue
if command -v scontrol >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [[ -n "${jobs// /}" ]]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
      [[ -z "$(squeue -h -t all -o '%A %T' 2>/dev/null | grep -vE ' (COMPLETED|CANCELLED|FAILED|TIMEOUT|PREEMPTED|NODE_FAIL|BOOT_FAIL|DEADLINE|OUT_OF_MEMORY)$')" ]] && break
      sleep 0.1
    done
  fi
fi

# 2. slurmd(s) (single: /run/slurmd.pid, fake multi-node: /run/slurmd-<node>.pid)
# (signal all of them first, then wait, so N fake nodes stop in parallel)
for pf in /run/slurmd.pid /run/slurmd-*.pid; do
  [[ -f "$pf" ]] || continue
  pid=$(cat "$pf" 2>/dev/null)
  [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == slurmd ]] && { log "stopping slurmd (pid $pid, $pf)"; kill -TERM "$pid" 2>/dev/null; }
done
for pf in /run/slurmd.pid /run/slurmd-*.pid; do
  [[ -f "$pf" ]] || continue
  stop_pid "$(cat "$pf" 2>/dev/null)" slurmd 15
  rm -f "$pf"
done
# leftover step daemons (only exist if a job refused to die); exact-name match, by pid
for pid in $(pgrep -x slurmstepd 2>/dev/null); do stop_pid "$pid" slurmstepd 5; done

# 3. slurmctld (saves its state on SIGTERM)
if [[ -f /run/slurmctld.pid ]]; then
  stop_pid "$(cat /run/slurmctld.pid 2>/dev/null)" slurmctld 20
  rm -f /run/slurmctld.pid
fi

# 4. munged
if [[ -f /run/munge/munged.pid ]]; then
  stop_pid "$(cat /run/munge/munged.pid 2>/dev/null)" munged 10
  rm -f /run/munge/munged.pid
fi

if ((PURGE)); then
  rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm/*.log /etc/slurm/slurm.conf /etc/slurm/hosts.ci
  log "purged state, spool, logs and generated config"
fi
log "cluster stopped"
exit 0
