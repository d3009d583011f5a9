#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for testing the launch/ scripts (needs root, slurm-wlm, munge).
#
#   launch/local_cluster.sh start DIR     # munged + slurmctld + slurmd with their state, logs and slurm.conf in DIR
#   SLURM_CONF=DIR/slurm.conf sbatch --wait launch/slurm_single_node.sbatch recipes/finetune.py --config ...
#   launch/local_cluster.sh stop DIR      # stops exactly the daemons started above (their pid files)
#
# Install the daemons on Debian/Ubuntu with: apt-get install -y slurm-wlm munge
# Ports are picked per DIR so several clusters (or a system Slurm) do not collide.
set -euo pipefail

cmd=${1:?usage: local_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: local_cluster.sh start|stop DIR}")

stop() {
    for name in slurmd slurmctld munged; do
        if [[ -f "$dir/$name.pid" ]]; then
            kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
}

start() {
    for exe in munged slurmctld slurmd sbatch; do
        command -v "$exe" >/dev/null || { echo "missing $exe: apt-get install -y slurm-wlm munge" >&2; exit 3; }
    done
    [[ $(id -u) == 0 ]] || { echo "starting slurmd needs root" >&2; exit 3; }
    mkdir -p "$dir"/{state,spool,munge}
    local host cpus mem port
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    port=$(( 20000 + $(cksum <<<"$dir" | cut -d' ' -f1) % 20000 ))

    # munge: own key and socket, so nothing of a system-wide munge is touched
    [[ -f "$dir/munge/munge.key" ]] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 700 "$dir/munge"; chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

    cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF" -i
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 1
    done
    echo "slurm did not come up; logs in $dir" >&2
    stop
    exit 4
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) echo "usage: local_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
