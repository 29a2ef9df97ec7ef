#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, with accounting, for tests and for trying the
# sweep presets (configs/hydra/launcher/slurm.yaml) on one machine.
#
#   scripts/slurm_local.sh start    # install (Debian/Ubuntu, root) + start; idempotent
#   scripts/slurm_local.sh status   # daemons, sinfo, squeue
#   scripts/slurm_local.sh stop     # stop the daemons this script started (by pid file)
#
# What it runs, as plain background daemons (no systemd, no cgroups):
#   munged, mariadbd + slurmdbd (accounting: sacct works, so a job that died without a
#   result is seen as ended), slurmctld, slurmd. The node is this machine (its short
#   hostname, NodeAddr=127.0.0.1) with the CPUs and memory `slurmd -C` reports, in one
#   partition `local` (default). No GPUs are declared: run presets with
#   hydra.launcher.gpus_per_node=null.
#
# Fast requeue for tests: AuthInfo=cred_expire=10 and SchedulerParameters=bf_interval=1,
# sched_interval=2 (the defaults make a requeued job wait ~2 min).
#
# Environment:
#   SLURM_LOCAL_DIR   state, logs, pid files (default /var/tmp/peft-vit-slurm)
#   SLURM_LOCAL_NO_DBD=1   skip mariadb/slurmdbd (no accounting; sacct then fails)
#   SLURM_LOCAL_FORCE=1    overwrite an /etc/slurm/slurm.conf this script did not write
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/tmp/peft-vit-slurm}
ETC=/etc/slurm
CONF=$ETC/slurm.conf
DBDCONF=$ETC/slurmdbd.conf
MARK="# written by peft-vit scripts/slurm_local.sh"
CLUSTER=peftvit
PARTITION=local
NODE=$(hostname -s)
USE_DBD=$([ "${SLURM_LOCAL_NO_DBD:-0}" = 1 ] && echo 0 || echo 1)
PKGS=(munge slurm-client slurmd slurmctld)
[ "$USE_DBD" = 1 ] && PKGS+=(slurmdbd mariadb-server)

log() { echo "[slurm_local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

wait_for() {  # wait_for <seconds> <description> <command...>
    local t=$1 what=$2; shift 2
    for _ in $(seq $((t * 2))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "timed out after ${t}s waiting for $what (logs in $STATE)"
}

install_packages() {
    local missing=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "packages missing (${missing[*]}) and not root: install them or run as root"
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get (Debian/Ubuntu only)"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # an existing package list is usually enough; refresh it once if the install fails
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1; then
        apt-get update -qq >>"$STATE/apt.log" 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
            || die "apt-get install failed, see $STATE/apt.log"
    fi
}

write_configs() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${SLURM_LOCAL_FORCE:-0}" != 1 ]; then
        die "$CONF exists and was not written by this script (a real cluster?); set SLURM_LOCAL_FORCE=1 to replace it"
    fi
    mkdir -p "$ETC" "$STATE/ctld" "$STATE/d"
    # the node as slurmd sees it: CPUs, sockets, cores, threads, memory (leave 1 GB to the OS)
    local hw mem
    hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    mem=$(slurmd -C | head -1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( mem > 2048 ? mem - 1024 : mem ))
    local acct="AccountingStorageType=accounting_storage/none"
    if [ "$USE_DBD" = 1 ]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
    fi
    cat >"$CONF.tmp" <<EOF
$MARK
# single-node test cluster on localhost; state and logs in $STATE
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job restarts after cred_expire (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    if [ "$USE_DBD" = 1 ]; then
        cat >"$DBDCONF.tmp" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$STATE/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
        chmod 600 "$DBDCONF.tmp"
        mv "$DBDCONF.tmp" "$DBDCONF"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    wait_for 20 munged sh -c 'munge -n | unmunge'
}

mariadb_up() { mariadb-admin --protocol=socket -uroot ping; }

start_mariadb() {
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if ! mariadb_up >/dev/null 2>&1; then
        if [ ! -d /var/lib/mysql/mysql ]; then
            log "initialising /var/lib/mysql"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/mariadb-install.log" 2>&1
        fi
        log "starting mariadbd"
        nohup /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
            --pid-file=/run/mysqld/mariadb.pid --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M \
            >"$STATE/mariadb.log" 2>&1 &
        wait_for 60 mariadbd mariadb_up
    fi
    mariadb --protocol=socket -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    if ! pid_alive "$STATE/slurmdbd.pid"; then
        log "starting slurmdbd"
        slurmdbd
    fi
    wait_for 60 slurmdbd sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

node_state() { { sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true; } | head -1; }

start_slurm() {
    if ! pid_alive "$STATE/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld
    fi
    wait_for 30 slurmctld scontrol ping
    if ! pid_alive "$STATE/slurmd.pid"; then
        log "starting slurmd"
        slurmd
    fi
    local s
    for _ in $(seq 120); do
        s=$(node_state)
        case "$s" in
            idle|mix|alloc|comp) log "node $NODE is $s; partition $PARTITION up"; return 0 ;;
            down*|drain*|drng*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE did not become idle (state: ${s:-none}); see $STATE/slurmd.log, $STATE/slurmctld.log"
}

cmd_start() {
    mkdir -p "$STATE"
    install_packages
    write_configs
    start_munge
    if [ "$USE_DBD" = 1 ]; then start_mariadb; start_slurmdbd; fi
    start_slurm
}

stop_pidfile() {  # stop_pidfile <name> <pidfile>
    local f=$2 pid
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    log "stopping $1 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

cmd_stop() {
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile slurmdbd "$STATE/slurmdbd.pid"
    stop_pidfile mariadbd /run/mysqld/mariadb.pid
    stop_pidfile munged /run/munge/munged.pid
}

cmd_status() {
    local rc=0 name f
    for name in munged:/run/munge/munged.pid mariadbd:/run/mysqld/mariadb.pid slurmdbd:$STATE/slurmdbd.pid \
                slurmctld:$STATE/slurmctld.pid slurmd:$STATE/slurmd.pid; do
        f=${name#*:}
        if pid_alive "$f"; then echo "${name%%:*}: running (pid $(cat "$f"))"; else echo "${name%%:*}: stopped"; rc=1; fi
    done
    if command -v sinfo >/dev/null && scontrol ping >/dev/null 2>&1; then
        sinfo; squeue
    fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
