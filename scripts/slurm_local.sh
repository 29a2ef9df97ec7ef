#!/usr/bin/env bash
# A private single-node SLURM cluster on localhost, with accounting, for tests and for trying
# the sweep presets (configs/hydra/launcher/slurm.yaml) on one machine.
#
#   scripts/slurm_local.sh start    # install (Debian/Ubuntu, root) + start; idempotent
#   scripts/slurm_local.sh env      # prints: export SLURM_CONF=...  (eval it to use the cluster)
#   scripts/slurm_local.sh status   # daemons, sinfo, squeue
#   scripts/slurm_local.sh stop     # stop the daemons this script started (by pid file)
#
# What it runs, as plain background daemons (no systemd, no cgroups):
#   munged, mariadbd + slurmdbd (accounting: sacct works, as on a real cluster; the tests
#   read a job's requeues and end state from it, the launcher needs only squeue), slurmctld, slurmd. The node is this machine (its short
#   hostname, NodeAddr=127.0.0.1) with the CPUs and memory `slurmd -C` reports, in one
#   partition `local` (default). No GPUs are declared: run presets with
#   hydra.launcher.gpus_per_node=null.
#
# Private: it never reads or writes /etc/slurm, /etc/munge or a system MariaDB. Its configs
# (slurm.conf, slurmdbd.conf), munge key and socket, database, state and logs all live in
# $SLURM_LOCAL_DIR, and its daemons listen on their own ports (slurmctld 16817, slurmd 16818,
# slurmdbd 16819, MariaDB 16306, all on 127.0.0.1), so it runs beside a real SLURM install
# without touching it. SLURM commands reach it only with SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf
# (see `env`); without it they talk to whatever cluster the machine belongs to.
#
# Fast requeue for tests: AuthInfo=cred_expire=10 and SchedulerParameters=bf_interval=1,
# sched_interval=2 (the defaults make a requeued job wait ~2 min).
#
# Environment:
#   SLURM_LOCAL_DIR   configs, state, logs, pid files (default /var/tmp/peft-vit-slurm)
#   SLURM_LOCAL_NO_DBD=1   skip mariadb/slurmdbd (no accounting; sacct then fails)
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/tmp/peft-vit-slurm}
CONF=$STATE/slurm.conf
DBDCONF=$STATE/slurmdbd.conf       # slurmdbd reads it from SLURM_CONF's directory
MUNGE=$STATE/munge
MUNGE_SOCKET=$MUNGE/munge.socket
DB=$STATE/mysql
CTLD_PORT=16817 SLURMD_PORT=16818 DBD_PORT=16819 DB_PORT=16306
MARK="# written by peft-vit scripts/slurm_local.sh"
CLUSTER=peftvit
export SLURM_CONF=$CONF
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
    mkdir -p "$STATE/ctld" "$STATE/d"
    # the node as slurmd sees it: CPUs, sockets, cores, threads, memory (leave 1 GB to the OS)
    local hw mem
    hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    mem=$(slurmd -C | head -1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( mem > 2048 ? mem - 1024 : mem ))
    local acct="AccountingStorageType=accounting_storage/none"
    if [ "$USE_DBD" = 1 ]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for accounting_storage/slurmdbd: the munge socket to reach slurmdbd with
AccountingStoragePass=$MUNGE_SOCKET"
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
# this cluster's own munged; a requeued job restarts after cred_expire (default 120 s)
AuthInfo=cred_expire=10,socket=$MUNGE_SOCKET
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
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    if [ "$USE_DBD" = 1 ]; then
        cat >"$DBDCONF.tmp" <<EOF
$MARK
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$STATE/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
        chmod 600 "$DBDCONF.tmp"
        mv "$DBDCONF.tmp" "$DBDCONF"
    fi
}

munge_up() { munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET"; }

start_munge() {  # this cluster's own munged: own key, socket, pid and log files
    if munge_up >/dev/null 2>&1; then return 0; fi
    mkdir -p "$MUNGE"
    chmod 700 "$MUNGE"
    [ -s "$MUNGE/munge.key" ] || { dd if=/dev/urandom of="$MUNGE/munge.key" bs=1 count=1024 2>/dev/null; }
    chmod 400 "$MUNGE/munge.key"
    log "starting munged"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" \
        --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
    wait_for 20 munged munge_up
}

mariadb_up() { mariadb-admin --no-defaults --protocol=socket --socket="$DB/mysqld.sock" -uroot ping; }

start_mariadb() {  # a private MariaDB: own data dir, socket and port (not the system one)
    if ! mariadb_up >/dev/null 2>&1; then
        if [ ! -d "$DB/data/mysql" ]; then
            log "initialising $DB"
            mkdir -p "$DB/data"
            chown -R mysql:mysql "$DB"
            mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" --auth-root-authentication-method=socket \
                >"$STATE/mariadb-install.log" 2>&1
        fi
        log "starting mariadbd"
        nohup /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/mysqld.sock" \
            --pid-file="$DB/mariadb.pid" --port=$DB_PORT --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M \
            >"$STATE/mariadb.log" 2>&1 &
        wait_for 60 mariadbd mariadb_up
    fi
    mariadb --no-defaults --protocol=socket --socket="$DB/mysqld.sock" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        FLUSH PRIVILEGES;"
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
    stop_pidfile mariadbd "$DB/mariadb.pid"
    stop_pidfile munged "$MUNGE/munged.pid"
}

cmd_status() {
    local rc=0 name f
    for name in munged:$MUNGE/munged.pid mariadbd:$DB/mariadb.pid slurmdbd:$STATE/slurmdbd.pid \
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
    env) echo "export SLURM_CONF=$CONF" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
