#!/usr/bin/env bash
# The diffusion suites on one GPU, many runs at once (distill bench --jobs): the device check of the
# diffusion family. Usage (on a machine with CUDA and PyTorch): bash benchmarks/diffusion_gpu.sh OUT [SUITE...]
# Wheels of what the machine lacks may sit in .whl/ (installed to /tmp/site first). Writes OUT/<suite>.tar.gz
# (leaderboards, metrics, histories, sample grids: no weights) and OUT/gpu.txt.
set -u
OUT=${1:?output folder}; shift
SUITES=${*:-diffusion-digits}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/distill . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/distill:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, distill; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
for s in $SUITES; do
  start=$(date +%s)
  timeout ${SUITE_TIMEOUT:-400} python3 -m distill.cli bench "$s" --jobs ${JOBS:-16} --out /tmp/bench/$s > "$OUT/$s.log" 2>&1
  echo "$s: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
  (cd /tmp/bench && find "$s" \( -name '*.md' -o -name '*.csv' -o -name '*.json' -o -name '*.png' -o -name recipe.yaml \) \
     -not -path '*/checkpoints/*' -not -path '*/tensorboard/*' | tar czf "$OUT/$s.tar.gz" -T -)
  tail -60 "/tmp/bench/$s/leaderboard.md" 2>/dev/null
done
