#!/usr/bin/env bash
# tests/slurm/start_slurm.sh - single-node SLURM test cluster for the brainage tests
# (tests/test_slurm.py, CI). Debian bookworm box/container without systemd, run as root.
# Idempotent: re-running leaves healthy daemons alone, restarts them only if a config
# file changed. /etc/slurm is machine-wide: one test cluster per machine.
#
#   start_slurm.sh          install (if needed) + start munge, [mariadb, slurmdbd], slurmctld, slurmd
#   start_slurm.sh stop     stop every daemon listed below, by its pid file
#   start_slurm.sh status   exit 0 when the node is usable (idle/mixed/allocated), else 1
#
# Knobs (environment):
#   SLURM_ACCOUNTING=1   1: MariaDB + slurmdbd, so `sacct` works (the Snakemake SLURM
#                        executor's default status command, and the test checks job states
#                        with it). 0: AccountingStorageType=accounting_storage/none (then
#                        use `slurm-status-command: squeue` in the Snakemake profile).
#   SLURM_FAKE_GPUS=1    number of fake gres/gpu (0-4; File=/dev/null, /dev/zero, ...) on the
#                        node, so rules with resources gpu=N (train_encoder, evaluate_encoder)
#                        are schedulable on a CPU-only box. 0 = no GRES at all.
#   SLURM_CPUS=$(nproc)  CPUs advertised. > nproc oversubscribes (SlurmdParameters=config_overrides).
#   SLURM_PARTITION=debug   SLURM_CLUSTER=testcluster
#   SLURM_APT_LOG=/var/log/start_slurm_apt.log   where apt-get's output goes
#
# Exit status: 0 ready; 1 failure; 3 the packages could not be installed (no root, no
# network/apt cache) - tests/test_slurm.py skips on 3 outside CI.
#
# Adapted from the project's shared recipe; the project carries its own copy so that it
# runs from a plain checkout.
set -euo pipefail

ACCT=${SLURM_ACCOUNTING:-1}
FAKE_GPUS=${SLURM_FAKE_GPUS:-1}
NCPU_HW=$(nproc)
CPUS=${SLURM_CPUS:-$NCPU_HW}
PART=${SLURM_PARTITION:-debug}
CLUSTER=${SLURM_CLUSTER:-testcluster}
H=$(hostname -s)
DBPASS=slurmpw

PID_MUNGE=/run/munge/munged.pid
PID_MYSQL=/run/mysqld/mysqld.pid
PID_DBD=/run/slurmdbd.pid
PID_CTLD=/run/slurmctld.pid
PID_SLURMD=/run/slurmd.pid

log() { echo "[start_slurm $(date +%T)] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # stop_pidfile <pidfile> <name>
  if alive "$1"; then
    local p; p=$(cat "$1"); log "stopping $2 (pid $p)"; kill "$p" || true
    for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$p" 2>/dev/null && { log "$2 did not exit, SIGKILL"; kill -9 "$p" || true; }
  fi
  rm -f "$1"
}
wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "ERROR: timed out after ${t}s waiting for $what"; return 1
}
CHANGED=0
write_if_changed() {  # write_if_changed <file> <mode>  (content on stdin)
  local tmp; tmp=$(mktemp)
  cat > "$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else
    install -m "$2" "$tmp" "$1"; rm -f "$tmp"; CHANGED=1; log "wrote $1"; fi
}

if [ "${1:-}" = stop ]; then
  stop_pidfile $PID_SLURMD slurmd
  stop_pidfile $PID_CTLD slurmctld
  stop_pidfile $PID_DBD slurmdbd
  stop_pidfile $PID_MYSQL mariadbd
  stop_pidfile $PID_MUNGE munged
  exit 0
fi
if [ "${1:-}" = status ]; then
  case "$(sinfo -h -n "$H" -o %T 2>/dev/null)" in idle|mixed|allocated|completing) exit 0;; esac
  exit 1
fi
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 3; }
T0=$(date +%s)

# ---------------------------------------------------------------- 1. packages
PKGS="slurm-wlm munge"
[ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
MISSING=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || MISSING="$MISSING $p"
done
if [ -n "$MISSING" ]; then
  log "apt-get install$MISSING"
  export DEBIAN_FRONTEND=noninteractive
  APT_LOG=${SLURM_APT_LOG:-/var/log/start_slurm_apt.log}
  { apt-get update -qq && apt-get install -y -qq $MISSING; } > "$APT_LOG" 2>&1 \
    || { tail -30 "$APT_LOG"; log "ERROR: could not install$MISSING (see $APT_LOG)"; exit 3; }
fi
log "packages ok ($(dpkg-query -W -f='${Version}' slurmctld) slurm, $(dpkg-query -W -f='${Version}' munge) munge)"

# hostname must resolve (SlurmctldHost / NodeName)
getent hosts "$H" >/dev/null || { echo "127.0.0.1 $H" >> /etc/hosts; log "added $H to /etc/hosts"; }

# ---------------------------------------------------------------- 2. munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"; mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! alive $PID_MUNGE; then
  log "starting munged"; runuser -u munge -- /usr/sbin/munged
fi
wait_for 20 munge bash -c 'munge -n | unmunge'

# ---------------------------------------------------------------- 3. config files
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
MEM=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)
if [ "$ACCT" = 1 ]; then
  # job_comment: sacct shows the comment the Snakemake executor sets (rule_<rule>_...)
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$H
AccountingStoreFlags=job_comment"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
GRES_NODE=""; GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$FAKE_GPUS"
  [ "$ACCT" = 1 ] && ACCT_LINES="$ACCT_LINES
AccountingStorageTRES=gres/gpu"
  # A File= is required: without it slurmd reports 0 gpus and the node goes INVAL/DRAIN
  # ("gres/gpu count reported lower than configured (0 < 1)"). Each GPU needs its own
  # device file ("gpu duplicate device file name" is fatal): harmless character devices.
  FAKE_DEVICES=(/dev/null /dev/zero /dev/full /dev/urandom)
  [ "$FAKE_GPUS" -le "${#FAKE_DEVICES[@]}" ] \
    || { echo "SLURM_FAKE_GPUS=$FAKE_GPUS: at most ${#FAKE_DEVICES[@]} fake GPUs" >&2; exit 1; }
  for i in $(seq 0 $((FAKE_GPUS - 1))); do
    echo "NodeName=$H Name=gpu File=${FAKE_DEVICES[$i]} Count=1"
  done | write_if_changed /etc/slurm/gres.conf 0644
else
  if [ -f /etc/slurm/gres.conf ]; then rm -f /etc/slurm/gres.conf; CHANGED=1; fi
fi
OVERRIDES=""
[ "$CPUS" -gt "$NCPU_HW" ] && OVERRIDES="SlurmdParameters=config_overrides"

write_if_changed /etc/slurm/slurm.conf 0644 <<EOF
# generated by start_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$H
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
DefMemPerCPU=1024
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PID_CTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$ACCT_LINES
JobCompType=jobcomp/none
$GRES_TYPES
$OVERRIDES
NodeName=$H CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ---------------------------------------------------------------- 4. accounting (optional)
if [ "$ACCT" = 1 ]; then
  write_if_changed /etc/slurm/slurmdbd.conf 0600 <<EOF
AuthType=auth/munge
DbdHost=$H
DbdAddr=$H
SlurmUser=root
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=$PID_DBD
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
  install -d -o mysql -g root -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || { log "initialising mariadb datadir"; mariadb-install-db --user=mysql >/dev/null; }
  if ! alive $PID_MYSQL; then
    log "starting mariadbd"
    nohup /usr/sbin/mariadbd --user=mysql --pid-file=$PID_MYSQL >> /var/log/slurm/mariadb.log 2>&1 &
  fi
  wait_for 60 mariadb mysqladmin ping
  mysql -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  if [ "$CHANGED" = 1 ]; then stop_pidfile $PID_DBD slurmdbd; fi
  if ! alive $PID_DBD; then log "starting slurmdbd"; /usr/sbin/slurmdbd; fi
  # sacctmgr only talks to slurmdbd when slurm.conf says accounting_storage/slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    log "registering cluster $CLUSTER"; sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
else
  stop_pidfile $PID_DBD slurmdbd
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if [ "$CHANGED" = 1 ]; then
  stop_pidfile $PID_SLURMD slurmd
  stop_pidfile $PID_CTLD slurmctld
fi
if ! alive $PID_CTLD; then log "starting slurmctld"; /usr/sbin/slurmctld; fi
wait_for 30 slurmctld scontrol ping
if ! alive $PID_SLURMD; then log "starting slurmd"; /usr/sbin/slurmd; fi

node_ok() { case "$(sinfo -h -n "$H" -o %T 2>/dev/null)" in idle|mixed|allocated|completing) return 0;; esac; return 1; }
RESUMED=0
for _ in $(seq 1 120); do
  node_ok && break
  st=$(sinfo -h -n "$H" -o %T 2>/dev/null || true)
  case "$st" in
    *drain*|down*|inval*|fail*)
      if [ "$RESUMED" = 0 ]; then
        log "node state '$st' ($(sinfo -h -n "$H" -o %E)); resuming"
        scontrol update nodename="$H" state=resume || true; RESUMED=1
      fi;;
  esac
  sleep 0.5
done
node_ok || { log "ERROR: node not usable: $(sinfo -h -n "$H" -o '%T %E')"; exit 1; }
log "cluster ready in $(( $(date +%s) - T0 ))s:"
sinfo -o '%P %a %l %D %T %N %c %m %G'
