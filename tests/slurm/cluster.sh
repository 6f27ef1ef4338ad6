#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the sweep's tests: `cluster.sh start` / `cluster.sh stop`.
#
# start: installs Debian's slurm-wlm and munge when missing, writes a minimal slurm.conf for this machine
#        (its cores and memory, no cgroups: proctrack/linuxproc, task/none), starts munged, slurmctld and
#        slurmd as root and waits until `sinfo` shows the node idle.
# stop:  stops the three daemons this script started (by the pid files it wrote), nothing else.
#
# Needs root (the daemons run as SlurmUser=root). Everything but the config lives in $KDLIB_SLURM_DIR
# (default /var/tmp/kdlib-slurm): state, spool, logs, pid files. The partition `debug` has a default
# time limit of 10 minutes, so a job that forgets --time cannot hang the tests for long.
set -euo pipefail

STATE=${KDLIB_SLURM_DIR:-/var/tmp/kdlib-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by kdlib tests/slurm/cluster.sh"

log() { echo "slurm-cluster: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
    log "needs root (or passwordless sudo) to run $1"; return 1; fi; }

apt_retry() {  # other processes may hold the dpkg lock: wait for it rather than fail
    local i
    for i in $(seq 1 60); do
        if as_root env DEBIAN_FRONTEND=noninteractive apt-get "$@"; then return 0; fi
        log "apt-get $1 failed (dpkg lock held?), retrying in 10 s ($i/60)"; sleep 10
    done
    return 1
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null; then return 0; fi
    command -v apt-get >/dev/null || { log "no apt-get: install slurm-wlm and munge by hand"; return 1; }
    log "installing slurm-wlm and munge (apt-get)"
    apt_retry update -q
    apt_retry install -y -q --no-install-recommends slurm-wlm munge
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # slurmd -C prints what it detects; leave 512 MB to the system so the node is never "low memory"
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mem=$(( ${mem:-1024} > 1024 ? ${mem:-1024} - 512 : ${mem:-1024} ))
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script: leaving it alone"; return 1
    fi
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log" /etc/slurm
    cat > "$CONF" <<CONF
$MARK
ClusterName=kdlib-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120): 10 on one node
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# keep ended jobs visible to scontrol for 10 minutes (the sweep reads their final state there)
MinJobAge=600
KillWait=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES DefaultTime=10 MaxTime=INFINITE State=UP
CONF
    # no cgroup.conf: the plugins above never read one
}

start_munge() {
    if [ -f "$STATE/munged.pid" ] && kill -0 "$(cat "$STATE/munged.pid")" 2>/dev/null; then return 0; fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # a munged already answers
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chmod 400 /etc/munge/munge.key
    fi
    # as root (--force: root-owned key and socket directory are fine for a test cluster); the pid file
    # lets `stop` end exactly this daemon
    munged --force --pid-file="$STATE/munged.pid"
}

start() {
    if [ "$(id -u)" != 0 ]; then log "start needs root"; exit 1; fi
    install
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        log "already running (stop it first to rewrite the config)"; sinfo; return 0
    fi
    write_conf
    start_munge
    slurmctld -i 2>>"$STATE/log/start.err" || { log "slurmctld failed: $(tail -3 "$STATE/log/slurmctld.log")"; exit 1; }
    slurmd 2>>"$STATE/log/start.err" || { log "slurmd failed: $(tail -3 "$STATE/log/slurmd.log")"; exit 1; }
    local i state
    for i in $(seq 1 120); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
        case "$state" in
            idle) log "node $(hostname -s) idle after ${i}x0.5 s"; sinfo; return 0 ;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "the node did not become idle (state '${state:-none}'); logs in $STATE/log"
    tail -5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    exit 1
}

stop_pid() {
    local file=$1 pid i
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}

stop() {
    scancel --user=root 2>/dev/null || true  # jobs first, so slurmd does not leave orphans behind
    stop_pid "$STATE/slurmd.pid"
    stop_pid "$STATE/slurmctld.pid"
    stop_pid "$STATE/munged.pid"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
