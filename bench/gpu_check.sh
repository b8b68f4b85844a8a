#!/usr/bin/env bash
# GPU check of DDP training, then of the data path at real scale (see the end): torchrun --nproc_per_node=1 (nccl) on train.yaml + multi_gpu_train.yaml, 2 epochs of a
# small synthetic dataset (16 volumes of ~70^3: 8 train, 8 validation; 16 patches of 64^3 per step) with AMP fp16 +
# GradScaler; prints training throughput and peak GPU memory. About 2-4 min, most of it start-up.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with one CUDA GPU
#
# Exits non-zero when anything fails (missing package, no GPU, training error, no figures).
#
# Requirements: torch with CUDA must be there already (never reinstalled here). The other packages come from
# .whl/ when that folder exists (a machine without internet: fetch them elsewhere for its Python, e.g. 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     monai==1.6.1 pytorch-ignite==0.5.5 fire termcolor imagecodecs connected-components-3d surface-distance==0.1
# ), else from requirements.txt through pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== requirements"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$WORK/site"
else
    grep -v '^torch' requirements.txt > "$WORK/requirements.txt"
    "$PY" -m pip install -q -r "$WORK/requirements.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import torch, monai, ignite, fire, tifffile, imagecodecs  # noqa: F401
assert torch.cuda.is_available(), "no CUDA GPU visible"
assert torch.distributed.is_nccl_available(), "this torch has no NCCL"
print(f"torch {torch.__version__}, monai {monai.__version__}, GPU {torch.cuda.get_device_name(0)}")
EOF

echo "== synthetic dataset"
"$PY" -c "
from pipeline.data.synth import SynthConfig, generate_dataset
generate_dataset('$WORK/data', SynthConfig(n_train=16, n_test=1))
"

# prints the backend before training and the figures after it (the multi-GPU run, then these two lines)
cat > "$WORK/gpu_check.yaml" <<'EOF'
run:
- "$print('GPU_CHECK backend', torch.distributed.get_backend(), 'device', @device, 'world', torch.distributed.get_world_size(), flush=True)"
- "$pipeline.utils.distributed.run_and_teardown(@train#trainer)"
- "$print('GPU_CHECK amp', @train#trainer.amp_dtype, 'GradScaler', @train#trainer.scaler is not None, 'scale', @train#trainer.scaler.get_scale() if @train#trainer.scaler else None, flush=True)"
- "$print('GPU_CHECK last epoch {:.1f} patches/s, peak GPU memory {:.2f} GiB'.format(len(@train#dataloader) * @batch_size * @num_samples / @train#trainer.state.times['EPOCH_COMPLETED'], torch.cuda.max_memory_allocated() / 2**30), flush=True)"
EOF

echo "== DDP training, 1 GPU, nccl, fp16 + GradScaler"
timeout 600 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m monai.bundle run training \
    --config_file "['bundle/configs/train.yaml','bundle/configs/multi_gpu_train.yaml','$WORK/gpu_check.yaml']" \
    --dataset_dir "'$WORK/data'" --output_dir "'$WORK/out'" --ckpt_dir "'$WORK/models'" \
    --epochs 2 --val_interval 1 --patch_size "[64,64,64]" --batch_size 2 --num_samples 8 --num_workers 2 \
    --amp True --amp_dtype "'fp16'" 2>&1 | tee "$WORK/train.log"

grep -q "GPU_CHECK backend nccl" "$WORK/train.log" || { echo "FAIL: not trained on nccl" >&2; exit 1; }
grep -q "GPU_CHECK amp torch.float16 GradScaler True" "$WORK/train.log" || { echo "FAIL: no fp16 + GradScaler" >&2; exit 1; }
test -s "$WORK/models/model.pt" || { echo "FAIL: no model.pt written" >&2; exit 1; }
echo "== result"
grep "GPU_CHECK" "$WORK/train.log"
grep "throughput" "$WORK/train.log" | tail -1 || true

# Data wait at real scale: 8 volumes of 320^3, one GPU, 2 epochs of 16 patches per step, 4 loader workers.
# before: the previous train.yaml (CacheDataset + augmentation in the loader; from git, when the history is here);
# store-cpu: volume store, augmentation in the loader; store-gpu: the default (volume store, augmentation on the GPU).
echo "== data wait, 1 GPU, 320^3 volumes"
"$PY" - "$WORK/scale" <<'EOF2'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import numpy as np
from pipeline.data.synth import make_volume
from transforms.io import write_volume
out = Path(sys.argv[1])
def one(i):
    image, label = make_volume((320, 320, 320), 1000 + i, 1 + i % 2)
    write_volume(out / "train_images" / f"{100 + i}.tif", image)
    write_volume(out / "train_labels" / f"{100 + i}.tif", label)
    return f"{100 + i},{1 + i % 2}"
with ProcessPoolExecutor(8) as pool:
    rows = list(pool.map(one, range(8)))
(out / "train.csv").write_text("id,scroll_id\n" + "\n".join(rows) + "\n")
EOF2
if git show 3acf90e:bundle/configs/train.yaml > "$WORK/train_before.yaml" 2>/dev/null; then VARIANTS="before store-cpu store-gpu"; else
    echo "before: not measured (no git history in this copy)"; VARIANTS="store-cpu store-gpu"; fi
for PATCH in 64 128; do
    for V in $VARIANTS; do
        CFG="bundle/configs/train.yaml"; EXTRA=(--cache_dir "'$WORK/store'")
        [ "$V" = before ] && { CFG="$WORK/train_before.yaml"; EXTRA=(); }
        [ "$V" = store-cpu ] && EXTRA+=(--augment_on_device False)
        timeout 900 "$PY" -m monai.bundle run training --config_file "$CFG" --dataset_dir "'$WORK/scale'" \
            --output_dir "'$WORK/out_$V$PATCH'" --ckpt_dir "'$WORK/models_$V$PATCH'" --epochs 2 --val_interval 100 \
            --patch_size "[$PATCH,$PATCH,$PATCH]" --batch_size 2 --num_samples 8 --num_workers 4 --val_score False \
            --training_curves False --tensorboard_preview False "${EXTRA[@]}" > "$WORK/scale_$V$PATCH.log" 2>&1 \
            || { tail -30 "$WORK/scale_$V$PATCH.log"; echo "FAIL: $V at $PATCH^3" >&2; exit 1; }
        echo "DATA_WAIT $V ${PATCH}^3: $(grep 'Epoch 2 throughput' "$WORK/scale_$V$PATCH.log" | sed 's/.*throughput: //')"
    done
done
echo "GPU CHECK PASSED"
