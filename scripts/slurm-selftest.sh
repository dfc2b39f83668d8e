#!/usr/bin/env bash
# Proof on a real scheduler: a single-node SLURM cluster on this machine (slurmctld + slurmd, munge,
# no accounting database) runs a small cohort of synthetic phantoms (plus one unreadable scan)
# through `--profile profiles/slurm` (grouped model jobs, ingest/qc job arrays), and every table
# (scans, vertebrae, discs, morphometry, change; all but change must have rows) must equal a local
# run's (ignoring seconds_* timing columns, created_by and config_sha256, which hashes the
# differing outdir).
#
#   sudo scripts/slurm-selftest.sh            # Debian/Ubuntu; installs slurm-wlm and munge with apt-get
#
# Needs root (apt-get, munged, slurmd). Touches nothing global except those packages and munge's
# default socket: slurm.conf, state, spool and logs live in $SELFTEST_DIR (SLURM_CONF points there,
# /etc/slurm is left alone), and only the daemons this script started are stopped at the end.
# Environment: SELFTEST_DIR (default /tmp/spinecohort-slurm-selftest), SELFTEST_SCANS (default 4),
# SELFTEST_TARGET (default: the tables; `all` adds the report), SELFTEST_KEEP=1 keeps the cluster up.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${SELFTEST_DIR:-/tmp/spinecohort-slurm-selftest}"
SCANS="${SELFTEST_SCANS:-4}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
START=$(date +%s)
log() { printf '[selftest %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (apt-get, munged and slurmd need it)"
"$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
  || die "snakemake-executor-plugin-slurm missing: $REPO/.venv/bin/pip install -e '$REPO[slurm]'"

# ---------------------------------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# --------------------------------------------------------------------------------------- the cluster
rm -rf "$W"
mkdir -p "$W"/{state,spool,run/config,cohort}
STARTED_PIDS=()
cleanup() {
  local rc=$?
  if [[ "${SELFTEST_KEEP:-0}" != 1 ]]; then
    for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  fi
  if (( rc != 0 )); then
    for f in "$W"/slurmctld.log "$W"/slurmd.log; do [[ -f $f ]] && { echo "--- tail $f"; tail -n 20 "$f"; }; done
  fi
  exit $rc
}
trap cleanup EXIT

if ! munge -n </dev/null >/dev/null 2>&1; then
  log "starting munged"
  [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
  chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
  STARTED_PIDS+=("$(cat /run/munge/munged.pid)")
  munge -n </dev/null >/dev/null || die "munged does not answer"
fi

HOST="$(hostname -s)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
export SLURM_CONF="$W/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=spinecohort-selftest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=${SELFTEST_PORT:-16817}
SlurmdPort=$(( ${SELFTEST_PORT:-16817} + 1 ))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# squeue-based status polling needs finished jobs to stay visible for a while.
MinJobAge=600
# The profile asks up to 8 CPUs and 8 GB a job: declare more than this machine has (oversubscribed,
# the selftest's jobs are tiny) instead of changing the profile.
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=16 RealMemory=$(( MEM_MB > 64000 ? MEM_MB : 64000 )) State=UNKNOWN
PartitionName=selftest Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

# Inside a job the plugin's jobstep drops every SLURM_* variable (SLURM_CONF too) before it calls
# srun; real clusters keep slurm.conf in /etc/slurm, which this script leaves alone. So jobs find
# an srun on PATH that knows where this cluster's slurm.conf is.
mkdir -p "$W/bin"
printf '#!/bin/sh\nSLURM_CONF=%q exec %q "$@"\n' "$SLURM_CONF" "$(command -v srun)" >"$W/bin/srun"
chmod +x "$W/bin/srun"
export PATH="$W/bin:$PATH"

log "starting slurmctld and slurmd ($SLURM_CONF)"
slurmctld -f "$SLURM_CONF"
for _ in $(seq 100); do [[ -s $W/slurmctld.pid ]] && break; sleep 0.1; done
STARTED_PIDS+=("$(cat "$W/slurmctld.pid")")
slurmd -f "$SLURM_CONF" -N "$HOST"
for _ in $(seq 100); do [[ -s $W/slurmd.pid ]] && break; sleep 0.1; done
STARTED_PIDS+=("$(cat "$W/slurmd.pid")")
for _ in $(seq 120); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  [[ $state == idle* || $state == mix* ]] && break
  sleep 0.5
done
[[ $state == idle* || $state == mix* ]] || die "node $HOST not idle (sinfo state: '${state:-none}')"
log "cluster up: $(sinfo -h -o '%P %D %t %c CPUs')"

# ------------------------------------------------------------------------------------------ cohort
# Synthetic phantoms (the demo cohort's), so both runs find vertebrae and discs and every table is
# compared with rows in it; plus one folder that is not DICOM, so a failed scan is compared too.
"$PY" -m spinecohort.cli demo-cohort "$W/cohort" --n-scans "$SCANS" --seed 11 >/dev/null
mkdir -p "$W/cohort/junk"
printf 'not dicom' >"$W/cohort/junk/x.dcm"
"$PY" - "$W/cohort/manifest.csv" <<'EOF'
import sys
import pandas as pd

manifest = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)
bad = {c: "" for c in manifest.columns} | {"scan_id": "bad", "subject_id": "subX", "path": "junk"}
pd.concat([manifest, pd.DataFrame([bad])]).to_csv(sys.argv[1], index=False)
EOF
cp "$REPO/config/config.yaml" "$W/run/config/config.yaml"
TARGET_OF() { if [[ "${SELFTEST_TARGET:-tables}" == all ]]; then echo all; else echo "$1/tables/scans.parquet"; fi; }
# Both runs use the slurm profile's pipeline config (shard_size, device) and 2 scans a shard.
COMMON=(--snakefile "$REPO/Snakefile" --configfile "$REPO/profiles/slurm/cluster.yaml")
CONFIG=(manifest="$W/cohort/manifest.csv" shard_size=2)

# --------------------------------------------------------------------------------------- local run
log "local run"
(cd "$W/run" && env -u SLURM_CONF "$PY" -m snakemake "${COMMON[@]}" --cores 2 \
   --config "${CONFIG[@]}" outdir="$W/local" -- "$(TARGET_OF "$W/local")" >"$W/local.log" 2>&1) \
  || { tail -n 40 "$W/local.log"; die "local run failed ($W/local.log)"; }

# ----------------------------------------------------------------------------------- cluster run
log "cluster run (--profile profiles/slurm)"
CLUSTER_START=$(date +%s)
export SPINECOHORT_SLURM_PARTITION=selftest
(cd "$W/run" && "$PY" -m snakemake --snakefile "$REPO/Snakefile" --profile "$REPO/profiles/slurm" \
   --slurm-status-command squeue --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs \
   --config "${CONFIG[@]}" outdir="$W/slurm" -- "$(TARGET_OF "$W/slurm")" >"$W/slurm.log" 2>&1) \
  || { tail -n 60 "$W/slurm.log"; die "cluster run failed ($W/slurm.log)"; }
CLUSTER_SECONDS=$(( $(date +%s) - CLUSTER_START ))
JOBS=$(squeue -h --states=all -o '%i %T' | wc -l)
NOT_DONE=$(squeue -h --states=all -o '%T' | grep -vc COMPLETED || true)
log "cluster run done in ${CLUSTER_SECONDS}s: $JOBS SLURM jobs, $NOT_DONE not COMPLETED"
squeue -h --states=all -o '  job %.4i  %.2C CPUs  %.6m mem  %.8l limit  %P  %T  %k' | sort -k2n
grep -q "submitted with SLURM jobid" "$W/slurm.log" || die "no job went through sbatch"
[[ -n $(find "$W/run/.snakemake/slurm_logs" -name '*.log' | head -1) ]] || die "no SLURM job logs"

# --------------------------------------------------------------------------------------- compare
"$PY" - "$W/local" "$W/slurm" <<'EOF'
import sys
from pathlib import Path
import pyarrow.parquet as pq

local, slurm = Path(sys.argv[1]), Path(sys.argv[2])
IGNORED = {b"created_by", b"config_sha256", b"pandas"}
for name in ("scans", "vertebrae", "discs", "morphometry", "change"):
    tables = []
    for root in (local, slurm):
        table = pq.read_table(root / "tables" / f"{name}.parquet")
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k not in IGNORED}
        tables.append((table.select([c for c in table.column_names if not c.startswith("seconds_")]), meta))
    (a, meta_a), (b, meta_b) = tables
    if not a.equals(b) or meta_a != meta_b:
        print(f"tables/{name}.parquet differs:\nlocal:\n{a.to_pandas()}\nslurm:\n{b.to_pandas()}\n{meta_a}\n{meta_b}")
        sys.exit(1)
    # an empty table would prove nothing (change needs two visits of a subject: it may be empty)
    if name in ("vertebrae", "discs", "morphometry") and a.num_rows == 0:
        print(f"tables/{name}.parquet has no rows in either run: the comparison proves nothing")
        sys.exit(1)
    print(f"tables/{name}.parquet: {a.num_rows} rows, identical")
scans = pq.read_table(slurm / "tables" / "scans.parquet").to_pandas()
print("scan status:", dict(scans["status"].value_counts()))
EOF
log "PASS: cluster tables equal the local run's (total ${SECONDS}s)"
