set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi -L; T0=$(date +%s); C=$(git rev-parse --short HEAD 2>/dev/null); echo "commit $C"
python3 .gpu/signal_imdb.py /tmp/simdb 4000 1000
python3 -c "from lra_benchmarks.data import get_task; [get_task('listops').load(s) for s in ('train','validation','test')]" > /dev/null 2>&1
# 1. causal: the Pallas kernels against the XLA chunk-parallel core (bf16, PosRF h2 d32 m128, 65536 tokens)
timeout 200 python3 -m lra_benchmarks.benchmarks.kernel_speed --mode=causal --reps=10 --chunks=128 --chunk_lengths=64k \
  --causal_pallas_configs=64:4,128:4,64:8,128:8 --out_dir=$OUT/causal > $OUT/causal.log 2>&1
echo "causal $(( $(date +%s) - T0 )) s"; sed -n 8,60p $OUT/causal/kernel_causal.md; grep -i "error" $OUT/causal.log | head -3
# 2. accuracy parity, pallas vs xla, same seed (ListOps generated; Text: synthetic aclImdb, planted signal)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for impl in pallas xla; do
  for task in listops text; do
    DD=""; [ $task = text ] && DD="--config.data_dir=/tmp/simdb"
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 python3 -m lra_benchmarks.train --config=configs/${task}_posrf_qmc.py --workdir=/tmp/par/$task-$impl \
      --config.num_train_steps=3000 --config.eval_every=1000 --config.checkpoint_every=3000 --config.progress_bar=False \
      --config.model.implementation=$impl $DD > /tmp/par_${task}_$impl.log 2>&1 &
  done
done
( sleep 210; pkill -TERM -f lra_benchmarks.train ) & WD=$!
wait $(jobs -p | grep -v "^$WD$") 2>/dev/null; kill $WD 2>/dev/null
echo "parity $(( $(date +%s) - T0 )) s"
for f in /tmp/par_*.log; do echo "== $f"; grep -iE "error|Traceback" $f | tail -2; done
# 3. what users run, one process at a time: the trainer's steps/s and peak memory (600 steps)
S="python3 -m lra_benchmarks.study --concurrent=1 --data_dir=text:/tmp/simdb --set=num_train_steps=600 --set=eval_every=600 --set=num_eval_steps=5"
timeout 170 $S --tasks=text,listops --attentions=flash,posrf-qmc --workdir=/tmp/sp > $OUT/sp.log 2>&1
echo "speed $(( $(date +%s) - T0 )) s"; sed -n '/## Efficiency/,/## Runs/p' /tmp/sp/study.md
python3 - <<'PY'
import json, glob, os
rows = []
for f in sorted(glob.glob('/tmp/par/*/results.json') + glob.glob('/tmp/sp/**/results.json', recursive=True)):
  r = json.load(open(f)); rows.append(dict(run=f, **{k: r.get(k) for k in ('test_accuracy', 'best_validation_accuracy', 'best_step', 'tested_step', 'steps', 'steps_per_second', 'peak_memory_bytes', 'peak_memory_source', 'device_kind')}))
print(json.dumps(rows, indent=1)); json.dump(rows, open(os.environ['OUT'] + '/runs.json', 'w'), indent=1)
PY
