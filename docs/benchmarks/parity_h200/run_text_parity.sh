set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi -L; T0=$(date +%s); rm -rf /tmp/par2
[ -d /tmp/limdb ] || python3 .gpu/letter_imdb.py /tmp/limdb 4000 1000
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for impl in pallas xla; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 -m lra_benchmarks.train --config=configs/text_posrf_qmc.py --workdir=/tmp/par2/text-$impl \
    --config.num_train_steps=3000 --config.eval_every=1000 --config.checkpoint_every=3000 --config.progress_bar=False \
    --config.model.implementation=$impl --config.data_dir=/tmp/limdb > /tmp/par2_text_$impl.log 2>&1 &
done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 python3 - > $OUT/causal_acc.txt 2>&1 <<'PY' &
from lra_benchmarks.benchmarks import kernel_speed as ks
args = ks.parse_args(["--mode=causal", "--causal_pallas_configs=128:8"])
print(ks.causal_accuracy(1024, args))
PY
( sleep 170; pkill -TERM -f lra_benchmarks.train ) & WD=$!
wait $(jobs -p | grep -v "^$WD$") 2>/dev/null; kill $WD 2>/dev/null
echo "done $(( $(date +%s) - T0 )) s"; cat $OUT/causal_acc.txt | tail -2
python3 - <<'PY'
import json, glob, os
rows = []
for f in sorted(glob.glob('/tmp/par2/*/results.json')):
  r = json.load(open(f)); rows.append(dict(run=f, **{k: r.get(k) for k in ('test_accuracy', 'best_validation_accuracy', 'best_step', 'tested_step', 'steps', 'steps_per_second', 'peak_memory_bytes', 'device_kind')}))
print(json.dumps(rows, indent=1)); json.dump(rows, open(os.environ['OUT'] + '/parity_text.json', 'w'), indent=1)
PY
for f in /tmp/par2_*.log; do grep -iE "Traceback|Error|validation" $f | tail -3; done
