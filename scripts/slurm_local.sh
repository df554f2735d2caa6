#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the submitit-launcher test (tests/test_slurm.py):
#
#   bash scripts/slurm_local.sh start   # install slurmctld, slurmd, munge (Debian/Ubuntu packages) if missing,
#                                       # write a one-node slurm.conf, start munged, slurmctld and slurmd,
#                                       # wait until the node is idle; prints the partition name
#   bash scripts/slurm_local.sh stop    # stop the daemons
#
# Needs root (or passwordless sudo) and apt-get. The node offers this machine's CPUs and 3/4 of its memory in
# one partition, `featurelens`; there is no accounting database (submitit then tells finished jobs by their
# result files). Exit status 0: the cluster is up; 1: it could not be started (the reason on stderr).
set -uo pipefail
PARTITION=featurelens
CONF_DIR=/etc/slurm
STATE=/var/spool/featurelens-slurm
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "slurm_local: needs root or passwordless sudo" >&2; exit 1; fi
fi

fail() { echo "slurm_local: $*" >&2; exit 1; }

install() {
  command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 \
    && command -v sbatch >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || fail "no apt-get to install slurmctld, slurmd and munge"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null 2>&1 &&
      $SUDO apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1; } ||
    fail "apt-get could not install slurmctld slurmd slurm-client munge"
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)
  $SUDO mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" /var/log/slurm
  $SUDO tee "$CONF_DIR/slurm.conf" >/dev/null <<EOF
# written by featurelens scripts/slurm_local.sh: one node, one partition, no accounting
ClusterName=featurelens
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install
  write_conf
  $SUDO mkdir -p /run/munge /var/lib/munge /var/log/munge
  $SUDO chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null
  if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
      $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  $SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || $SUDO runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
  pgrep -x slurmctld >/dev/null || $SUDO slurmctld || fail "slurmctld did not start (/var/log/slurm/slurmctld.log)"
  pgrep -x slurmd >/dev/null || $SUDO slurmd || fail "slurmd did not start (/var/log/slurm/slurmd.log)"
  for _ in $(seq 60); do
    state=$(sinfo -h -p "$PARTITION" -o %t 2>/dev/null | head -1)
    case "$state" in
      idle*|mix*|alloc*) echo "$PARTITION"; return 0 ;;
      down*|drain*) $SUDO scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 1
  done
  fail "the node did not become idle within 60 s (sinfo: ${state:-nothing}; see /var/log/slurm/)"
}

stop() {
  $SUDO pkill -x slurmd; $SUDO pkill -x slurmctld; $SUDO pkill -x munged
  return 0
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) fail "usage: $0 start|stop" ;;
esac
