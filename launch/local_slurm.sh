#!/usr/bin/env bash
# A real one-node SLURM (munged + slurmctld + slurmd) on this machine, so that the launcher is tested against a real
# controller in `make test` and in CI (fresh machine, root, no systemd).
#
#   launch/local_slurm.sh start    install the Debian packages if missing, write the config, start the daemons that are
#                                  not running yet, wait until the node is idle (idempotent)
#   launch/local_slurm.sh stop     cancel the jobs on this cluster, stop exactly the daemons that `start` started
#   launch/local_slurm.sh status   daemons, pids, node state, queue
#   launch/local_slurm.sh env      print `export SLURM_CONF=...` for clients (sbatch, squeue, submitit)
#
# Everything lives under $EXPLAINER_SLURM_DIR (default /tmp/explainer-slurm): etc/slurm.conf, state/, spool/, log/,
# run/*.pid. Clients find the config through SLURM_CONF; /etc/slurm/slurm.conf is linked to it only when absent.
# Knobs: EXPLAINER_SLURM_CPU_FACTOR (CPUs declared = cores x factor, default 4, so that 2-task jobs and small job
# arrays share a 2-core machine), EXPLAINER_SLURM_PORT (slurmctld port, default 6817; slurmd uses port + 1).
set -euo pipefail

DIR="${EXPLAINER_SLURM_DIR:-/tmp/explainer-slurm}"
CPU_FACTOR="${EXPLAINER_SLURM_CPU_FACTOR:-4}"
PORT="${EXPLAINER_SLURM_PORT:-6817}"
CONF="$DIR/etc/slurm.conf"
RUN="$DIR/run"
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=/run/munge/munge.socket.2
WAIT_S="${EXPLAINER_SLURM_WAIT_S:-60}"
export SLURM_CONF="$CONF"

log() { echo "[local_slurm] $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid of a daemon we started, if it is still alive and still that program (pid files can go stale)
alive_pid() {
    local name=$1 file="$RUN/$1.pid" pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -d /proc/$pid ]] || return 1
    grep -q "$name" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them (Debian/Ubuntu only)"
    local t0=$SECONDS added_policy=0
    log "installing ${missing[*]} (apt-get)"
    # No init system here: keep the packages' postinst from trying to start services.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >"$DIR/log/apt.log" 2>&1 ||
        { tail -20 "$DIR/log/apt.log" >&2; die "apt-get install failed (full log: $DIR/log/apt.log)"; }
    ((added_policy)) && rm -f /usr/sbin/policy-rc.d
    log "installed in $((SECONDS - t0)) s"
}

munge_works() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        alive_pid munged >/dev/null || log "munged already running (not ours, left alone)"
        return 0
    fi
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating munge key $key"
        install -d -m 0700 -o munge -g munge /etc/munge
        dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
    chown munge:munge "$key" && chmod 0400 "$key"
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge
    rm -f "$RUN/munged.pid"
    # munged refuses to run as root; it writes its pid file itself (a dir it can write to)
    install -d -m 0755 -o munge -g munge "$RUN/munge"
    runuser -u munge -- munged --pid-file="$RUN/munge/munged.pid" --log-file="$RUN/munge/munged.log" 9>&-
    ln -sf "$RUN/munge/munged.pid" "$RUN/munged.pid"
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    tail -5 "$RUN/munge/munged.log" >&2 || true
    die "munged did not come up (log: $RUN/munge/munged.log)"
}

write_conf() {
    local node cores mem_mb cpus
    node=$(hostname -s)
    cores=$(nproc --all)
    cpus=$((cores * CPU_FACTOR))
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$DIR/etc"
    cat >"$CONF.tmp" <<EOF
# Written by launch/local_slurm.sh: one-node test cluster on $node ($cores cores, declared $cpus CPUs).
ClusterName=explainer
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroup delegation in containers: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Declared CPUs exceed the cores on purpose (oversubscription for tiny test jobs).
SlurmdParameters=config_overrides
ReturnToService=2
# Checkpointable jobs requeue themselves (submitit calls scontrol requeue); finished jobs leave the queue quickly.
JobRequeue=1
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    if [[ ! -e $SYSTEM_CONF && ! -L $SYSTEM_CONF ]]; then
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        ln -s "$CONF" "$SYSTEM_CONF" && touch "$RUN/system_conf_link"
    fi
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

wait_idle() {
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) log "node $(hostname -s) is $state"; return 0 ;;
            down* | drain* | fail*)
                scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node not idle after ${WAIT_S}s (state: '${state:-unknown}'); logs in $DIR/log"
}

cmd_start() {
    ((EUID == 0)) || die "start needs root (installs packages, runs munged/slurmd)"
    mkdir -p "$DIR"/{etc,state,spool,log,run}
    exec 9>"$DIR/lock"  # daemons are started with 9>&- so that they do not inherit the lock
    flock 9
    local t0=$SECONDS
    install_packages
    start_munge
    if ! alive_pid slurmctld >/dev/null || ! alive_pid slurmd >/dev/null; then
        write_conf
    fi
    if ! alive_pid slurmctld >/dev/null; then
        rm -f "$RUN/slurmctld.pid"
        slurmctld -f "$CONF" 9>&- || die "slurmctld failed to start (log: $DIR/log/slurmctld.log)"
    fi
    for _ in $(seq $((WAIT_S * 10))); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    scontrol ping >/dev/null 2>&1 || { tail -20 "$DIR/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
    if ! alive_pid slurmd >/dev/null; then
        rm -f "$RUN/slurmd.pid"
        slurmd -f "$CONF" 9>&- || die "slurmd failed to start (log: $DIR/log/slurmd.log)"
    fi
    wait_idle
    log "up in $((SECONDS - t0)) s; clients need: export SLURM_CONF=$CONF"
}

stop_pid() {
    local name=$1 pid
    pid=$(alive_pid "$name") || { rm -f "$RUN/$name.pid"; return 0; }
    kill -TERM "$pid"
    for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    if [[ -d /proc/$pid ]]; then
        log "$name ($pid) ignores SIGTERM, killing"
        kill -KILL "$pid" || true
    fi
    rm -f "$RUN/$name.pid"
    log "stopped $name ($pid)"
}

cmd_stop() {
    [[ -d $DIR ]] || { log "nothing to stop ($DIR does not exist)"; return 0; }
    exec 9>"$DIR/lock"  # daemons are started with 9>&- so that they do not inherit the lock
    flock 9
    if alive_pid slurmctld >/dev/null; then
        scancel --quiet --full --state=RUNNING,PENDING,SUSPENDED 2>/dev/null || true
        scancel --quiet 2>/dev/null || true
    fi
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    if [[ -e $RUN/system_conf_link ]]; then
        [[ $(readlink "$SYSTEM_CONF" 2>/dev/null) == "$CONF" ]] && rm -f "$SYSTEM_CONF"
        rm -f "$RUN/system_conf_link"
    fi
}

cmd_status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        if pid=$(alive_pid "$name"); then
            echo "$name: running (pid $pid)"
        elif [[ $name == munged ]] && munge_works; then
            echo "munged: running (not started by this script)"
        else
            echo "$name: not running"
            rc=1
        fi
    done
    echo "SLURM_CONF=$CONF"
    if ((rc == 0)); then
        sinfo -N -o '%N %T %c %m' || rc=1
        squeue || rc=1
    fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
