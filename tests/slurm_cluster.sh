#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the opt-in test tier (make test-slurm).
#
#   bash tests/slurm_cluster.sh start    # install (if missing), configure, start, wait until the node is idle
#   bash tests/slurm_cluster.sh stop     # stop the daemons this script starts, in reverse order, by PID file
#   bash tests/slurm_cluster.sh status   # which daemons run, and sinfo
#
# Idempotent: `start` on a running, correctly configured cluster only checks that the node is idle; `stop` on a
# stopped one does nothing. Needs root and a Debian/Ubuntu machine (apt-get). Facts behind each choice:
# ../shared/docs/local-slurm.md, beside the repository (measured on a 2-core Debian 12 machine without systemd, SLURM 22.05).
set -euo pipefail

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
GRES_CONF=$CONF_DIR/gres.conf
MUNGE_KEY=/etc/munge/munge.key
# PID files: munged's is its compiled-in default; slurmctld's and slurmd's are set in slurm.conf below.
MUNGED_PID=/run/munge/munged.pid
SLURMCTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
NODE=localhost   # the node's name in slurm.conf, not the machine's hostname (slurmd is started with -N)
WAIT_SECONDS=${SLURM_CLUSTER_WAIT:-60}

log() { echo "slurm_cluster: $*" >&2; }

running() {  # running PIDFILE: the process named in PIDFILE is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    # Only what the tier needs; no slurmdbd/mariadb: the test profile polls with squeue, not sacct.
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Package scripts do not start services here (policy-rc.d / no systemd): this script starts the binaries itself.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

real_memory_mb() {
    # ~80% of the machine's memory for jobs, but never above what slurmd itself detects: a RealMemory larger
    # than `slurmd -C` reports makes the node INVALID and no job ever starts.
    local total detected
    total=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    detected=$(slurmd -C 2>/dev/null | tr ' ' '\n' | awk -F= '$1 == "RealMemory" {print $2}')
    if [[ -n $detected && $detected -lt $total ]]; then echo "$detected"; else echo "$total"; fi
}

write_config() {
    # Writes slurm.conf and gres.conf to $1 (a directory).
    local out=$1 cpus mem
    cpus=$(nproc)
    mem=$(real_memory_mb)
    cat > "$out/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh: a one-node cluster for the SLURM test tier. Regenerated on every start.
ClusterName=segsynth-test
SlurmctldHost=localhost
# Daemons and jobs run as root: this is a throwaway test cluster on a machine where the tests run as root.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# Processes tracked by parent PID and no task binding: neither needs cgroup access (containers, cgroup v1).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Cores and memory are the consumable resources, so two 1-CPU jobs share the node and --mem is enforced
# at scheduling time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: no accounting, so sacct has nothing to say (the test profile polls with squeue).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue for 10 minutes; the executor plugin polls with squeue only while
# MinJobAge >= 3 x its init-seconds-before-status-checks (else it silently falls back to sacct).
MinJobAge=600
# scancel: SIGTERM, then SIGKILL after 5 s (default 30 s), so the fault test's cancelled job ends quickly.
KillWait=5
InactiveLimit=0
# A node that was DOWN because slurmd stopped comes back by itself when slurmd registers again.
ReturnToService=2
SchedulerType=sched/backfill
# A fake GPU (see gres.conf), so rules with resources gpu=1 (sbatch --gpus=1) are scheduled, not rejected.
GresTypes=gpu
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
# DefMemPerCPU: without it a job that asks for no memory is given the whole node and runs alone.
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
# A GPU and a CPU partition over the same node, as a cluster has them over different nodes: the SLURM profile's
# partition file sends gpu=1 jobs to the one and all others to the other.
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP DefMemPerCPU=1000
PartitionName=cpu Nodes=$NODE MaxTime=INFINITE State=UP DefMemPerCPU=1000
EOF
    cat > "$out/gres.conf" <<EOF
# Written by tests/slurm_cluster.sh. One GPU that is not there: File= must name a device file or the node turns
# INVALID and GPU jobs pend forever; /dev/null satisfies it. Jobs get CUDA_VISIBLE_DEVICES=0 and still run on CPU.
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF
}

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    # munged refuses to start with a key or directories that others can read or write.
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    if running "$MUNGED_PID"; then return; fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
}

start_slurm() {
    mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
    if ! running "$SLURMCTLD_PID"; then
        log "starting slurmctld"
        /usr/sbin/slurmctld   # daemonises and writes its PID file
    fi
    if ! running "$SLURMD_PID"; then
        log "starting slurmd"
        # -N: the node is called localhost in slurm.conf whatever the machine's hostname is.
        /usr/sbin/slurmd -N "$NODE"
    fi
}

node_state() {
    sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1
}

wait_idle() {
    local deadline=$((SECONDS + WAIT_SECONDS)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated | completing) log "node $NODE is $state"; return 0 ;;
            # Left DOWN or DRAINED by an unclean stop (state under /var/lib/slurm survives restarts).
            down* | drain* | fail*)
                log "node $NODE is $state: resuming it"
                scontrol update nodename="$NODE" state=resume || true ;;
        esac
        sleep 1
    done
    log "node $NODE not idle after ${WAIT_SECONDS}s (state: ${state:-no answer}); see /var/log/slurm/"
    return 1
}

stop_one() {  # stop_one NAME PIDFILE: SIGTERM the process in PIDFILE and wait up to 20 s for it to exit
    local name=$1 pidfile=$2 pid
    running "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name ($pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    log "$name ($pid) still alive after 20 s"
    return 1
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || { log "must run as root"; exit 1; }
    install_packages
    local tmp
    tmp=$(mktemp -d)
    write_config "$tmp"
    if ! cmp -s "$tmp/slurm.conf" "$SLURM_CONF" || ! cmp -s "$tmp/gres.conf" "$GRES_CONF"; then
        # Daemons read their config at start: a changed config means a restart.
        if running "$SLURMD_PID" || running "$SLURMCTLD_PID"; then
            log "configuration changed: restarting slurmd and slurmctld"
            stop_one slurmd "$SLURMD_PID"
            stop_one slurmctld "$SLURMCTLD_PID"
        fi
        mkdir -p "$CONF_DIR"
        install -m 0644 "$tmp/slurm.conf" "$SLURM_CONF"
        install -m 0644 "$tmp/gres.conf" "$GRES_CONF"
    fi
    rm -rf "$tmp"
    start_munge
    start_slurm
    wait_idle
}

cmd_stop() {
    # Reverse order of start; by PID file, never by process name (other SLURM or munge processes are not ours).
    stop_one slurmd "$SLURMD_PID"
    stop_one slurmctld "$SLURMCTLD_PID"
    stop_one munged "$MUNGED_PID"
}

cmd_status() {
    local name pidfile rc=0
    for name in munged slurmctld slurmd; do
        case $name in
            munged) pidfile=$MUNGED_PID ;; slurmctld) pidfile=$SLURMCTLD_PID ;; slurmd) pidfile=$SLURMD_PID ;;
        esac
        if running "$pidfile"; then echo "$name: running ($(cat "$pidfile"))"; else echo "$name: stopped"; rc=3; fi
    done
    if command -v sinfo >/dev/null; then sinfo -N -o '%N %P %T %c %m %G' 2>&1 || rc=3; fi
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
