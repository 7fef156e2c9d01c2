#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py (Pydra's SLURM worker) and CI.
#
#   bash tests/slurm/start_cluster.sh           # install if needed, start, wait until a job runs
#   bash tests/slurm/start_cluster.sh --stop    # stop every daemon it started
#   bash tests/slurm/start_cluster.sh --status  # say what runs
#
# Debian/Ubuntu, as root, no systemd needed (a container is fine). Idempotent: running daemons are kept,
# missing ones are started; a changed slurm.conf restarts slurmctld and slurmd.
#
# What it runs: munged (authentication), MariaDB on 127.0.0.1:$HDAR_SLURM_DB_PORT with its own data
# directory (accounting storage), slurmdbd, slurmctld and slurmd. slurmdbd is there because Pydra's SLURM
# worker asks `sacct` for the state of every finished job, and sacct reads only from slurmdbd.
# No cgroups: proctrack/linuxproc, task/none, jobacct_gather/none.
#
# Environment (all optional):
#   HDAR_SLURM_STATE     state, logs and the database        (default /var/spool/hdar-slurm)
#   HDAR_SLURM_CONF_DIR  where slurm.conf/slurmdbd.conf go  (default /etc/slurm, where sbatch looks)
#   HDAR_SLURM_DB_PORT   MariaDB port                        (default 3307, not to collide with a 3306)
#   HDAR_SLURM_DBD_PORT  slurmdbd port                       (default 6819)
#   HDAR_SLURM_TIMEOUT   seconds to wait for the node        (default 60)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${HDAR_SLURM_STATE:-/var/spool/hdar-slurm}
CONF_DIR=${HDAR_SLURM_CONF_DIR:-/etc/slurm}
DB_PORT=${HDAR_SLURM_DB_PORT:-3307}
DBD_PORT=${HDAR_SLURM_DBD_PORT:-6819}
TIMEOUT=${HDAR_SLURM_TIMEOUT:-60}
CLUSTER=hdar
PARTITION=debug
MARKER="Written by hdar-pipeline tests/slurm/start_cluster.sh"
HOST=$(hostname -s)
MUNGE_PID=/run/munge/munged.pid
DB_RUN=$STATE/mariadb     # socket, pid and log of mariadbd (owned by mysql)
DB_SOCK=$DB_RUN/mysql.sock
DB_PID=$DB_RUN/mariadbd.pid
LOG=$STATE/log

say() { echo "start_cluster: $*"; }
die() {
    echo "start_cluster: ERROR: $*" >&2
    for f in "$LOG"/slurmctld.log "$LOG"/slurmd.log "$LOG"/slurmdbd.log "$DB_RUN"/mariadbd.log; do
        [ -s "$f" ] && { echo "---- last lines of $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

# alive PIDFILE: the pid file names a live process of the daemon the file is named after (a pid left over from
# before a reboot may belong to something else now, which must neither count as running nor be stopped)
alive() {
    local p name
    [ -s "$1" ] && p=$(cat "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
    name=$(basename "$1" .pid)
    case $(cat "/proc/$p/comm" 2>/dev/null) in "$name"*) return 0 ;; *) return 1 ;; esac
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL
    local name=$1 file=$2 pid i
    if ! alive "$file"; then rm -f "$file"; return 0; fi
    pid=$(cat "$file")
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then say "$name did not stop, SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$file"
}

stop_all() {
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile slurmdbd "$STATE/slurmdbd.pid"
    stop_pidfile mariadb "$DB_PID"
    stop_pidfile munged "$MUNGE_PID"
}

status() {
    local name file
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        case $name in munged) file=$MUNGE_PID ;; mariadb) file=$DB_PID ;; *) file=$STATE/$name.pid ;; esac
        if alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: stopped"; fi
    done
    command -v sinfo >/dev/null && timeout 10 sinfo 2>&1 || true
}

case "${1:-}" in
    --stop) stop_all; say "stopped"; exit 0 ;;
    --status) status; exit 0 ;;
    ""|--start) ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--start|--stop|--status]" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, starts daemons)"

# ---- 1. packages
missing=()
command -v sbatch >/dev/null || missing+=(slurm-wlm)
[ -x /usr/sbin/slurmdbd ] || missing+=(slurmdbd)
[ -x /usr/sbin/munged ] || missing+=(munge)
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"${TMPDIR:-/tmp}/hdar-slurm-apt.log" 2>&1 \
        || { tail -n 20 "${TMPDIR:-/tmp}/hdar-slurm-apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
fi
MARIADBD=$(command -v mariadbd || echo /usr/sbin/mariadbd)

mkdir -p "$STATE"/slurmctld "$STATE"/slurmd "$LOG" "$CONF_DIR"
chmod 755 "$STATE" "$LOG"

# ---- 2. munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating the munge key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! alive "$MUNGE_PID"; then
    say "starting munged"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    rm -f /run/munge/munge.socket.2*    # a stale socket from a killed munged
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
fi
for i in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# ---- 3. MariaDB for slurmdbd, own data directory, TCP on 127.0.0.1 only
db() { mariadb --no-defaults --socket="$DB_SOCK" -u root "$@"; }
if [ ! -d "$STATE/mysql/mysql" ]; then
    say "initialising the accounting database in $STATE/mysql"
    mkdir -p "$STATE/mysql"
    chown mysql:mysql "$STATE/mysql"
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
        >"$LOG/mariadb-install.log" 2>&1 || { cat "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
fi
if ! alive "$DB_PID"; then
    say "starting mariadb on 127.0.0.1:$DB_PORT"
    mkdir -p "$DB_RUN"
    chown mysql:mysql "$DB_RUN"
    setsid "$MARIADBD" --no-defaults --user=mysql --datadir="$STATE/mysql" --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DB_PID" \
        --log-error="$DB_RUN/mariadbd.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
        --max-allowed-packet=16M </dev/null >"$LOG/mariadbd.out" 2>&1 &
fi
for i in $(seq 60); do db -e "select 1" >/dev/null 2>&1 && break; sleep 0.5; done
db -e "select 1" >/dev/null 2>&1 || die "mariadb did not start"
[ -s "$STATE/db.pass" ] || { head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE/db.pass"; chmod 600 "$STATE/db.pass"; }
DB_PASS=$(cat "$STATE/db.pass")
db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
       CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
       ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "could not create the slurm database user"

# ---- 4. configuration (from the templates next to this script)
for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf"; do
    if [ -e "$f" ] && ! grep -q "$MARKER" "$f"; then
        die "$f exists and was not written by this script; move it away (or set HDAR_SLURM_CONF_DIR and SLURM_CONF)"
    fi
done
# The node as slurmd sees it (CPUs, sockets, cores, threads), with RealMemory a little under the real one.
node_line=$(slurmd -C | grep '^NodeName=' | head -n 1) || die "slurmd -C failed"
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
node_line=$(sed -e "s/^NodeName=[^ ]*/NodeName=$HOST/" -e "s/RealMemory=[0-9]*/RealMemory=$((real_mem * 9 / 10))/" <<<"$node_line")
render() {
    sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@NODE_LINE@|$node_line|g" "$1"
}
slurm_changed=0
render "$HERE/slurm.conf.in" >"$STATE/slurm.conf.new"
if ! cmp -s "$STATE/slurm.conf.new" "$CONF_DIR/slurm.conf"; then
    mv "$STATE/slurm.conf.new" "$CONF_DIR/slurm.conf"; chmod 644 "$CONF_DIR/slurm.conf"; slurm_changed=1
else rm -f "$STATE/slurm.conf.new"; fi
dbd_changed=0
( umask 077; render "$HERE/slurmdbd.conf.in" >"$STATE/slurmdbd.conf.new" )
if ! cmp -s "$STATE/slurmdbd.conf.new" "$CONF_DIR/slurmdbd.conf"; then
    mv "$STATE/slurmdbd.conf.new" "$CONF_DIR/slurmdbd.conf"; chmod 600 "$CONF_DIR/slurmdbd.conf"; dbd_changed=1
else rm -f "$STATE/slurmdbd.conf.new"; fi

# ---- 5. slurmdbd, then the cluster's record in it
if [ $dbd_changed = 1 ]; then stop_pidfile slurmdbd "$STATE/slurmdbd.pid"; fi
if ! alive "$STATE/slurmdbd.pid"; then
    say "starting slurmdbd"
    slurmdbd || die "slurmdbd did not start"
fi
for i in $(seq 60); do timeout 10 sacctmgr -n -P list cluster >/dev/null 2>&1 && break; sleep 1; done
timeout 10 sacctmgr -n -P list cluster >/dev/null 2>&1 || die "slurmdbd does not answer (sacctmgr list cluster)"
if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
fi

# ---- 6. slurmctld and slurmd
if [ $slurm_changed = 1 ]; then
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
fi
if ! alive "$STATE/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start"
fi
if ! alive "$STATE/slurmd.pid"; then
    say "starting slurmd"
    slurmd || die "slurmd did not start"
fi

# ---- 7. wait until the node is idle and a job runs, and its record reaches sacct (Pydra's worker needs both)
deadline=$((SECONDS + TIMEOUT))
state=""
while [ $SECONDS -lt $deadline ]; do
    state=$(timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n 1 || true)
    case $state in
        idle|mix|alloc) break ;;
        down*|drain*|drng*|fail*)
            timeout 10 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
case $state in idle|mix|alloc) ;; *) die "node $HOST not idle after ${TIMEOUT} s (sinfo state: '${state:-no answer}')" ;; esac
left=$((deadline - SECONDS)); [ $left -ge 15 ] || left=15
jobid=$(timeout "$left" srun -N1 -J hdar-probe sh -c 'echo $SLURM_JOB_ID' 2>"$LOG/srun-probe.err") \
    || { cat "$LOG/srun-probe.err" >&2; die "srun -N1 true did not run within ${left} s"; }
acct=""
for i in $(seq 30); do
    acct=$(timeout 10 sacct -n -X -j "$jobid" -o JobID,State,ExitCode 2>/dev/null || true)
    grep -q COMPLETED <<<"$acct" && break
    sleep 1
done
grep -q COMPLETED <<<"$acct" || die "job $jobid ran but sacct does not show it COMPLETED (got: '${acct}')"
say "cluster '$CLUSTER' up: node $HOST ($(sed 's/^NodeName=[^ ]* //' <<<"$node_line")), partition $PARTITION;" \
    "probe job $jobid COMPLETED in sacct (state and logs in $STATE)"
