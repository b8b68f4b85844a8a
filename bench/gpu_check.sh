#!/usr/bin/env bash
# GPU check of DDP training: torchrun --nproc_per_node=1 (nccl) on train.yaml + multi_gpu_train.yaml, 2 epochs of a
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
from pipeline.synth import SynthConfig, generate_dataset
generate_dataset('$WORK/data', SynthConfig(n_train=16, n_test=1))
"

# prints the backend before training and the figures after it (the multi-GPU run, then these two lines)
cat > "$WORK/gpu_check.yaml" <<'EOF'
run:
- "$print('GPU_CHECK backend', torch.distributed.get_backend(), 'device', @device, 'world', torch.distributed.get_world_size(), flush=True)"
- "$pipeline.distributed.run_and_teardown(@train#trainer)"
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
echo "GPU CHECK PASSED"
