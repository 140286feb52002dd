#!/usr/bin/env bash
# A real one-node SLURM (munged + slurmctld + slurmd) on this machine, so that the launcher is tested against a real
# controller in `make test` and in CI (fresh machine, root, no systemd).
#
#   launch/local_slurm.sh start    install the Debian packages if missing, write the config, start the daemons that are
#                                  not running yet, wait until the node is idle (idempotent)
#   launch/local_slurm.sh stop     cancel the jobs on this cluster, stop exactly the daemons that `start` started
#   launch/local_slurm.sh status   daemons, pids, node state, queue
#   launch/local_slurm.sh env      print `export SLURM_CONF=...` for clients (sbatch, squeue, submitit)
#   launch/local_slurm.sh start --nodes 2
#                                  two-node mode: slurmctld in this namespace, each slurmd in its own network namespace
#                                  (host names node1, node2; addresses SUBNET.11, .12; the controller at SUBNET.1 on a
#                                  bridge), so jobs span nodes with distinct host names and addresses as on a cluster
#   launch/local_slurm.sh exec node2 -- CMD...
#                                  run CMD on a node of the two-node mode (its network namespace and host name), e.g.
#                                  one torchrun per node
#
# Network (two-node mode only): a bridge exslbr0 with SUBNET.1/24 (EXPLAINER_SLURM_SUBNET, default 10.219.19; `start`
# refuses a subnet that is already routed here), namespaces explainer-node<i> with a veth each and no default route,
# and /etc/netns/explainer-node<i>/hosts (a node's /etc/hosts) naming the nodes. Nothing is forwarded: traffic
# stays between the controller's bridge address and the nodes. `stop` removes the namespaces, links and hosts files.
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
NODES="${EXPLAINER_SLURM_NODES:-1}"  # `start --nodes N` overrides
SUBNET="${EXPLAINER_SLURM_SUBNET:-10.219.19}"
NS_PREFIX=explainer-node
BRIDGE=exslbr0
export SLURM_CONF="$CONF"

log() { echo "[local_slurm] $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid of a daemon we started, if it is still alive and still that program (pid files can go stale);
# name: munged, slurmctld, slurmd (one-node mode) or slurmd-node<i> (two-node mode)
alive_pid() {
    local name=$1 file="$RUN/$1.pid" pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -d /proc/$pid ]] || return 1
    grep -q "${name%%-*}" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

running_nodes() { if [[ -s $RUN/nodes ]]; then cat "$RUN/nodes"; else echo 1; fi; }  # size of the cluster last started

# the slurmd pid-file names of a cluster of $1 nodes
slurmd_names() {
    local n=${1:-$NODES} i
    if ((n == 1)); then echo slurmd; else for ((i = 1; i <= n; i++)); do echo "slurmd-node$i"; done; fi
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((NODES == 1)) || command -v ip >/dev/null || missing+=(iproute2)  # the nodes' network namespaces
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
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$DIR/log/apt.log" 2>&1 ||
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
    local node cores mem_mb cpus ctl_addr=127.0.0.1 i
    node=$(hostname -s)
    ((NODES > 1)) && ctl_addr=$SUBNET.1
    cores=$(nproc --all)
    cpus=$((cores * CPU_FACTOR))
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$DIR/etc"
    cat >"$CONF.tmp" <<EOF
# Written by launch/local_slurm.sh: $NODES-node test cluster on $node ($cores cores, declared $cpus CPUs a node).
ClusterName=explainer
SlurmctldHost=$node($ctl_addr)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
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
EOF
    if ((NODES == 1)); then
        cat >>"$CONF.tmp" <<EOF
SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$RUN/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    else
        # one slurmd per node (slurmd -N node<i>); %n is the node name
        cat >>"$CONF.tmp" <<EOF
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
EOF
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=node$i NodeHostname=node$i NodeAddr=$SUBNET.$((10 + i)) CPUs=$cpus RealMemory=$mem_mb" \
                "State=UNKNOWN" >>"$CONF.tmp"
        done
        echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP" >>"$CONF.tmp"
    fi
    mv "$CONF.tmp" "$CONF"
    if [[ ! -e $SYSTEM_CONF && ! -L $SYSTEM_CONF ]]; then
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        ln -s "$CONF" "$SYSTEM_CONF" && touch "$RUN/system_conf_link"
    fi
}

# "name state" per line, every node of the cluster
node_states() { sinfo -h -N -o '%N %T' 2>/dev/null; }

wait_idle() {
    local states="" up name state
    for _ in $(seq $((WAIT_S * 2))); do
        states=$(node_states)
        up=0
        while read -r name state; do
            case $state in
                idle | mixed | allocated | completing) up=$((up + 1)) ;;
                down* | drain* | fail*) scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true ;;
            esac
        done <<<"$states"
        if ((up == NODES)); then
            log "nodes: $(tr '\n' ' ' <<<"$states")"
            return 0
        fi
        sleep 0.5
    done
    tail -20 "$DIR"/log/slurm*.log >&2 || true
    die "nodes not idle after ${WAIT_S}s (states: '${states:-unknown}'); logs in $DIR/log"
}

# ----------------------------------------------------------------------------------------------------------------------
# Two-node mode: network namespaces
# ----------------------------------------------------------------------------------------------------------------------

# The subnet must be ours alone: refuse one that is routed here by anything but our bridge.
check_subnet() {
    [[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
        die "EXPLAINER_SLURM_SUBNET must be the first three numbers of a /24, e.g. 10.219.19; got '$SUBNET'"
    local other
    other=$(ip -4 route show | awk -v net="$SUBNET.0/24" -v br="$BRIDGE" '$1 == net && $3 != br {print}')
    [[ -z $other ]] || die "subnet $SUBNET.0/24 is in use here ($other); choose another with EXPLAINER_SLURM_SUBNET"
}

net_up() {
    local i j ns
    check_subnet
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || die "cannot create the bridge $BRIDGE: the two-node mode needs" \
            "CAP_NET_ADMIN and CAP_SYS_ADMIN (a container: --privileged, or --cap-add NET_ADMIN --cap-add SYS_ADMIN)"
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    echo "$NODES" >"$RUN/netns"  # before the first namespace: a failure below still gets cleaned up by stop
    for ((i = 1; i <= NODES; i++)); do
        ns=$NS_PREFIX$i
        ip netns list | grep -q "^$ns\b" && continue
        ip netns add "$ns" || die "cannot create network namespace $ns (needs CAP_SYS_ADMIN)"
        ip link add "exsl$i" type veth peer name "exsl${i}n"
        ip link set "exsl${i}n" netns "$ns"
        ip link set "exsl$i" master "$BRIDGE"
        ip link set "exsl$i" up
        ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev "exsl${i}n"
        ip -n "$ns" link set "exsl${i}n" up
        ip -n "$ns" link set lo up
        # on_node bind-mounts it over /etc/hosts (as `ip netns exec` would): the node names resolve on every node
        [[ -d /etc/netns ]] || touch "$RUN/etc_netns_created"
        mkdir -p "/etc/netns/$ns"
        {
            echo "127.0.0.1 localhost"
            echo "$SUBNET.1 $(hostname -s)"
            for ((j = 1; j <= NODES; j++)); do echo "$SUBNET.$((10 + j)) node$j"; done
        } >"/etc/netns/$ns/hosts"
    done
}

net_down() {
    local n i ns pid
    [[ -s $RUN/netns ]] || return 0
    n=$(cat "$RUN/netns")
    for ((i = 1; i <= n; i++)); do
        ns=$NS_PREFIX$i
        if ip netns list | grep -q "^$ns\b"; then
            # what is left in our namespace (a task whose slurmd was killed) was started there by this cluster
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
        ip link del "exsl$i" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if [[ -e $RUN/etc_netns_created ]]; then rmdir /etc/netns 2>/dev/null || true; rm -f "$RUN/etc_netns_created"; fi
    rm -f "$RUN/netns"
    log "removed $n network namespace(s) and bridge $BRIDGE"
}

# on_node I CMD...: CMD in node I's network namespace, with host name node<I> (its own UTS namespace) and the
# cluster's /etc/hosts (a private mount namespace). Not `ip netns exec`: it remounts /sys, hiding /sys/fs/cgroup,
# without which slurmd refuses to start.
# (nsenter, unshare and sh each exec the next: CMD keeps the pid, so a signal to it reaches CMD.)
on_node() {
    local i=$1
    shift
    nsenter --net="/run/netns/$NS_PREFIX$i" unshare --mount --uts \
        sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' \
        "/etc/netns/$NS_PREFIX$i/hosts" "node$i" "$@"
}

start_slurmds() {
    local i name
    if ((NODES == 1)); then
        alive_pid slurmd >/dev/null && return 0
        rm -f "$RUN/slurmd.pid"
        slurmd -f "$CONF" 9>&- || die "slurmd failed to start (log: $DIR/log/slurmd.log)"
        return 0
    fi
    for ((i = 1; i <= NODES; i++)); do
        name=slurmd-node$i
        alive_pid "$name" >/dev/null && continue
        rm -f "$RUN/$name.pid"
        mkdir -p "$DIR/spool/node$i"
        on_node "$i" slurmd -N "node$i" -f "$CONF" 9>&- || die "slurmd node$i failed to start (log: $DIR/log/$name.log)"
    done
}

all_up() {
    local name
    alive_pid slurmctld >/dev/null || return 1
    for name in $(slurmd_names); do alive_pid "$name" >/dev/null || return 1; done
}

# A cluster of the other size is running: replace it if it runs no job, refuse otherwise.
switch_mode() {
    local was name
    was=$(running_nodes)
    ((was != NODES)) || return 0
    if alive_pid slurmctld >/dev/null; then
        [[ -z $(squeue -h 2>/dev/null) ]] ||
            die "a $was-node cluster is running jobs (squeue): wait for them or run '$0 stop' first"
        log "replacing the running $was-node cluster by a $NODES-node one"
    fi
    for name in $(slurmd_names "$was"); do stop_pid "$name"; done
    stop_pid slurmctld
    net_down
}

cmd_start() {
    ((EUID == 0)) || die "start needs root (installs packages, runs munged/slurmd)"
    [[ $NODES =~ ^[1-8]$ ]] || die "--nodes must be 1 to 8, got '$NODES'"
    mkdir -p "$DIR"/{etc,state,spool,log,run}
    exec 9>"$DIR/lock"  # daemons are started with 9>&- so that they do not inherit the lock
    flock 9
    local t0=$SECONDS
    install_packages
    start_munge
    switch_mode
    if ((NODES > 1)); then net_up; fi
    all_up || write_conf
    echo "$NODES" >"$RUN/nodes"
    if ! alive_pid slurmctld >/dev/null; then
        rm -f "$RUN/slurmctld.pid"
        slurmctld -f "$CONF" 9>&- || die "slurmctld failed to start (log: $DIR/log/slurmctld.log)"
    fi
    for _ in $(seq $((WAIT_S * 10))); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    scontrol ping >/dev/null 2>&1 || { tail -20 "$DIR/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
    start_slurmds
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
    local name
    for name in $(slurmd_names "$(running_nodes)"); do stop_pid "$name"; done
    stop_pid slurmctld
    stop_pid munged
    net_down
    rm -f "$RUN/nodes"
    if [[ -e $RUN/system_conf_link ]]; then
        [[ $(readlink "$SYSTEM_CONF" 2>/dev/null) == "$CONF" ]] && rm -f "$SYSTEM_CONF"
        rm -f "$RUN/system_conf_link"
    fi
}

cmd_status() {
    local name pid rc=0
    for name in munged slurmctld $(slurmd_names "$(running_nodes)"); do
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

cmd_exec() {
    local node=${1:-} i
    ((EUID == 0)) || die "exec needs root (it enters the node's network namespace)"
    [[ $node =~ ^node([1-8])$ ]] || die "usage: $0 exec node<i> -- CMD..."
    i=${BASH_REMATCH[1]}
    shift
    [[ ${1:-} == -- ]] && shift
    (($# > 0)) || die "usage: $0 exec $node -- CMD..."
    ip netns list | grep -q "^$NS_PREFIX$i\b" || die "$node does not exist: start the cluster with '$0 start --nodes 2'"
    on_node "$i" "$@"  # CMD stays in this script's process group: `kill -- -PGID` stops both
}

cmd=${1:-}
(($# > 0)) && shift
if [[ $cmd == start && ${1:-} == --nodes ]]; then
    NODES=${2:-}
    shift $(($# < 2 ? $# : 2))
fi
case "$cmd" in
    start) cmd_start ;;
    exec) cmd_exec "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start [--nodes N]|stop|status|env|exec node<i> -- CMD..." >&2; exit 2 ;;
esac
