#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, on localhost only: the real sbatch, srun and
# scontrol, for running (and testing) sweeps end to end the way they run on a cluster.
#
#   scripts/slurm_local.sh start     # install slurm-wlm and munge if missing (apt, as root), start
#                                    # munged, slurmctld and slurmd, wait until the node is idle
#   eval "$(scripts/slurm_local.sh env)"   # point sinfo, sbatch, srun of this shell at it
#   scripts/slurm_local.sh status    # the daemons and the node; exit 1 when the cluster is down
#   scripts/slurm_local.sh stop      # cancel its jobs, stop its daemons: nothing of it left running
#
# Everything lives under $KD_SLURM_DIR (default /tmp/kd-slurm): slurm.conf, the munge key and
# socket, the controller's state, the node's spool, the logs. Nothing system-wide is configured or
# started; clients find the cluster through SLURM_CONF. The node advertises this machine's cores and
# memory (slurmd -C); one partition, "local", is the default. Ports: $KD_SLURM_PORT (6817) and +1.
set -euo pipefail

dir=${KD_SLURM_DIR:-/tmp/kd-slurm}
port=${KD_SLURM_PORT:-6817}
export SLURM_CONF=$dir/slurm.conf
daemons=(slurmd slurmctld munged)  # stopped in this order, started in the reverse one

log() { echo "[slurm_local] $*" >&2; }

install() {
  local missing=()
  for tool in munged slurmctld slurmd sinfo sbatch srun scontrol squeue scancel; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "missing ${missing[*]}: run this as root on Debian or Ubuntu, or install slurm-wlm and munge"
    exit 1
  fi
  log "installing slurm-wlm and munge (missing: ${missing[*]})"
  apt-get update -qq
  # policy-rc.d or not, the packages' own services stay stopped: we start our own daemons below.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

pid_of() { [[ -s $dir/run/$1.pid ]] && kill -0 "$(cat "$dir/run/$1.pid")" 2>/dev/null && cat "$dir/run/$1.pid"; }

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

write_config() {
  mkdir -p "$dir"/{run,log,state,spool,munge}
  chmod 755 "$dir" "$dir/munge"  # munged: everyone may reach its socket, only root reads the key
  [[ -s $dir/munge/munge.key ]] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
                                      chmod 400 "$dir/munge/munge.key"; }
  local node
  node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... RealMemory=...: what this machine has
  cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm_local.sh: one node, this machine, reached on localhost only.
ClusterName=kd-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
# Listen on the address of this host's name (127.0.0.1), not on every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups in containers: processes are tracked by parentage, tasks are not pinned.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Requeue-friendly, as a preemptible partition is: batch jobs may be requeued (scontrol requeue,
# Lightning's SIGUSR1 handler; SLURM holds a requeued job about two minutes, its BeginTime, and
# "scontrol update JobId=ID StartTime=now" lets it go), and a job that is cancelled, requeued or
# at its time limit gets KillWait seconds after SIGTERM to save its state.
JobRequeue=1
KillWait=10
ReturnToService=2
# A job asking for more than the node has fails at sbatch instead of waiting for ever.
EnforcePartLimits=ALL
# Schedule within a second of a submission or a job's end (tests wait on it).
SchedulerParameters=bf_interval=1,sched_min_interval=100000
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  if pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null; then
    log "already running (SLURM_CONF=$SLURM_CONF)"
    return
  fi
  install
  stop quiet
  write_config
  munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  slurmctld -c -i  # a clean controller state: no jobs left from an earlier cluster
  slurmd -N "$(hostname -s)"
  for _ in $(seq 120); do
    [[ $(node_state) == idle ]] && { log "up: node $(hostname -s) idle; SLURM_CONF=$SLURM_CONF"; return; }
    sleep 0.5
  done
  log "the node did not become idle in 60 s; state: $(node_state || true)"
  tail -n 20 "$dir"/log/*.log >&2 || true
  stop
  exit 1
}

# The processes of this cluster: its daemons (pid files) and job steps (slurmstepd started by its
# slurmd, recognised by the SLURM_CONF in their environment). Never any other process.
our_pids() {
  local d p
  for d in "${daemons[@]}"; do pid_of "$d" || true; done
  for p in $(pgrep -x slurmstepd || true); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" && echo "$p"
  done
}

stop() {
  if pid_of slurmctld >/dev/null; then  # cancel every job first, so slurmd ends their processes
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
    [[ -z $jobs ]] || scancel --quiet $jobs || true
    for _ in $(seq 60); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.25; done  # KillWait: 10 s
  fi
  local d pid
  for d in "${daemons[@]}"; do
    pid=$(pid_of "$d" || true)
    [[ -n $pid ]] || continue
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  done
  for pid in $(our_pids); do kill -9 "$pid" 2>/dev/null || true; done  # job steps left behind
  sleep 0.2
  local left
  left=$(our_pids | tr '\n' ' ')
  [[ -z $left ]] || { log "still running: $left"; exit 1; }
  rm -f "$dir"/run/*.pid "$SLURM_CONF"  # without a config, clients fail at once instead of waiting on a controller
  [[ ${1:-} == quiet ]] || log "stopped; nothing of it running"
}

status() {
  local d ok=0
  for d in munged slurmctld slurmd; do
    if pid_of "$d" >/dev/null; then echo "$d: running (pid $(pid_of "$d"))"; else echo "$d: stopped"; ok=1; fi
  done
  [[ $ok -eq 0 ]] && sinfo -N -o "%N %T %c %m %P" || true
  return $ok
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
