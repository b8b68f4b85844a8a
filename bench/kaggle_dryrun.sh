#!/usr/bin/env bash
# The Kaggle box at this machine's scale: two training sessions of `python -m pipeline --time_limit T`, the first cut
# by the clock, the second continuing it from the first's read-only outputs (`--resume_from`) and finishing.
#
#   sudo bash bench/kaggle_dryrun.sh                          # 40 synthetic volumes of 320^3, one process
#   sudo bash bench/kaggle_dryrun.sh --nproc 2                # 2-process gloo DDP
#   sudo bash bench/kaggle_dryrun.sh --n 6 --size 96 --epochs 30 --limit1 60 --limit2 10m   # a quick look
#   sudo bash bench/kaggle_dryrun.sh ... -- --val_max_cases 2          # after --: bundle keys for both sessions
#
# As on Kaggle (README "On Kaggle"):
# - the project installed from its wheel in a fresh venv outside the repository (it sees this interpreter's torch,
#   MONAI, ... as Kaggle's image provides them; the wheel goes in with --no-index --no-deps);
# - the dataset folder read-only (mount --bind + remount,ro), as /kaggle/input;
# - every output (store, checkpoints, run folders, predictions) on a loop-mounted ext4 of 0.75 x the decoded
#   dataset (images + labels) + 256 MiB (ext4's own tables; the default network's checkpoints, ~14 MB each), as the
#   notebook's scratch disk; session 1's store is deleted before session 2 (the
#   next session starts with an empty /tmp);
# - RAM capped (cgroup v1) at 0.55 x the decoded dataset + 1.1 GiB per training process: Kaggle's 29-31 GB against
#   its 52.8 GB of decoded volumes;
# - no network (unshare -n, loopback up for gloo);
# - the default settings (skeletons on) with --epochs E (default 3: enough to cut and to finish).
# Prints, per session: the wall time against the limit, the peak memory of the cgroup (page cache included) against
# the cap, the disk used against the disk; whether training was cut or finished; the submission checked; the
# finished run's last validation score. Needs root, the cgroup-v1 memory controller and a loop device.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
N=40 SIZE=320 NPROC=1 EPOCHS=3 LIMIT1=20m LIMIT2=2h WORK=/tmp/kaggle_dryrun DATA=
PY=${PYTHON:-python3}
EXTRA=()                                           # after --: more bundle keys for both sessions
while [ $# -gt 0 ]; do
  case "$1" in
    --n) N=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --limit1) LIMIT1=$2; shift 2 ;;
    --limit2) LIMIT2=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "error: $0 needs root (mounts, cgroup, unshare)" >&2; exit 2; }
CGROUP_ROOT=/sys/fs/cgroup/memory
[ -w "$CGROUP_ROOT" ] || { echo "error: no cgroup-v1 memory controller at $CGROUP_ROOT" >&2; exit 2; }

RUN=$WORK/run                                      # the mounts live here; data and the venv are kept between runs
CG=$CGROUP_ROOT/kaggle_dryrun_$$
cleanup() {
  set +e
  for m in "$RUN/s1_ro" "$RUN/fs" "$RUN/input"; do mountpoint -q "$m" && umount "$m"; done
  [ -d "$CG" ] && rmdir "$CG"
}
trap cleanup EXIT
mkdir -p "$WORK"
cleanup
rm -rf "$RUN" && mkdir -p "$RUN"

# --- the dataset (generated once per size) and its decoded size ---
if [ -z "$DATA" ]; then
  DATA=$WORK/data_${N}x${SIZE}
  if [ ! -f "$DATA/train.csv" ]; then
    echo "generating $N synthetic volumes of ${SIZE}^3 into $DATA"
    "$PY" - "$DATA" "$N" "$SIZE" <<'EOF'
import sys
from pipeline.data.synth import SynthConfig, generate_dataset
out, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
generate_dataset(out, SynthConfig(n_train=n, n_test=2, shapes=((size, size, size),), n_scrolls=4, seed=0))
EOF
  fi
fi
DECODED=$("$PY" - "$DATA" <<'EOF'
import math, sys
from pathlib import Path
import numpy as np
from transforms.io import read_volume_header
total = 0
for folder in ("train_images", "train_labels", "test_images"):
    for path in sorted((Path(sys.argv[1]) / folder).glob("*.tif")):
        shape, dtype = read_volume_header(path)
        total += math.prod(shape) * np.dtype(dtype).itemsize
print(total)
EOF
)
DISK=$((DECODED * 3 / 4 + 268435456))            # + 256 MiB: ext4's own tables, the checkpoints
CAP=$((DECODED * 55 / 100 + NPROC * 1181116006))   # + 1.1 GiB per training process
gib() { awk -v b="$1" 'BEGIN { printf "%.2f GiB", b / 1073741824 }'; }
echo "dataset $DATA: decoded $(gib "$DECODED"); disk $(gib "$DISK"); memory cap $(gib "$CAP") ($NPROC process(es))"

# --- the wheel, in a fresh venv outside the repository ---
VENV=$WORK/venv
rm -rf "$WORK/dist" "$VENV"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$REPO" >/dev/null
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --no-deps "$WORK"/dist/vesuvius_bundle-*.whl
INSTALLED=$(cd / && "$VENV/bin/python" -c "import pipeline; print(pipeline.__file__)")
case "$INSTALLED" in "$VENV"/*) ;; *) echo "error: pipeline imports from $INSTALLED, not the venv's wheel" >&2; exit 1 ;; esac
echo "installed: $INSTALLED"

# --- read-only input, the scratch disk, the memory cap ---
mkdir -p "$RUN/input" "$RUN/fs" "$RUN/s1_ro"
mount --bind "$DATA" "$RUN/input" && mount -o remount,bind,ro "$RUN/input"
truncate -s "$DISK" "$RUN/disk.img" && mkfs.ext4 -q -F "$RUN/disk.img" && mount -o loop "$RUN/disk.img" "$RUN/fs"
mkdir "$CG" && echo "$CAP" > "$CG/memory.limit_in_bytes"

session() {  # session NAME LIMIT [extra pipeline args]: one notebook session, in the cgroup, offline
  local name=$1 limit=$2; shift 2
  local dir=$RUN/fs/$name
  mkdir -p "$dir"
  sync && echo 3 > /proc/sys/vm/drop_caches
  echo 0 > "$CG/memory.max_usage_in_bytes"
  local start rc
  start=$(date +%s.%N)
  set +e
  (
    echo "$BASHPID" > "$CG/cgroup.procs"
    cd "$dir"   # /kaggle/working
    exec unshare -n bash -c 'ip link set lo up && exec "$@"' _ "$VENV/bin/python" -m pipeline \
      --dataset_dir "$RUN/input" --output_dir "$dir/outputs" --ckpt_dir "$dir/models" --cache_dir "$RUN/fs/store" \
      --nproc "$NPROC" --epochs "$EPOCHS" --time_limit "$limit" "${EXTRA[@]}" "$@"
  ) > "$dir/log.txt" 2>&1
  rc=$?
  set -e
  local wall peak used
  wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }')
  peak=$(cat "$CG/memory.max_usage_in_bytes")
  used=$(($(df --output=used -B1 "$RUN/fs" | tail -1)))
  echo "== $name: exit code $rc; wall ${wall} s of time_limit $limit; peak memory $(gib "$peak") of $(gib "$CAP");" \
       "disk used $(gib "$used") of $(gib "$DISK")"
  grep -E "^\[pipeline\]|cut by the clock|epochs: auto|Resuming from|nothing copied|^error" "$dir/log.txt" | sed 's/^/   /' || true
  if [ "$rc" != 0 ]; then tail -20 "$dir/log.txt"; exit "$rc"; fi
  "$VENV/bin/python" - "$dir/outputs/submission.zip" "$RUN/input" <<'EOF'
import sys
from pipeline.data.datalist import test_datalist
from pipeline.inference.submission import check_submission
from transforms.io import read_volume_shape
check_submission(sys.argv[1], {c["id"]: read_volume_shape(c["image"]) for c in test_datalist(sys.argv[2])})
print(f"   {sys.argv[1]}: checked")
EOF
}

session s1 "$LIMIT1"
grep -q "cut by the clock" "$RUN/fs/s1/log.txt" || echo "   (session 1 was not cut by the clock: give a shorter --limit1)"
rm -rf "$RUN/fs/store"                      # the next session's /tmp is empty
mount --bind "$RUN/fs/s1" "$RUN/s1_ro" && mount -o remount,bind,ro "$RUN/s1_ro"   # /kaggle/input/<session 1>
session s2 "$LIMIT2" --resume_from "$RUN/s1_ro/models"
if grep -q "cut by the clock" "$RUN/fs/s2/log.txt"; then
  echo "   (session 2 was cut by the clock too: give a longer --limit2)"
fi
"$VENV/bin/python" - "$RUN/fs/s2/outputs" <<'EOF'
import json, sys
from pathlib import Path
rows = json.loads((Path(sys.argv[1]) / "latest_run" / "training_history.json").read_text())["epochs"]
last = [r for r in rows if r.get("val_score") is not None or r.get("val_dice") is not None][-1]
print(f"finished run: {len(rows)} epochs; last validation (epoch {last['epoch']}): "
      + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_") and isinstance(v, float)))
EOF
