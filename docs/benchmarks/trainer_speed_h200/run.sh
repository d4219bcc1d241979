set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi -L; T0=$(date +%s)
python3 .gpu/fake_imdb.py /tmp/imdb 1000
python3 -c "from lra_benchmarks.data import get_task; [get_task('listops').load(s) for s in ('train','validation','test')]" > /dev/null 2>&1
# 1. What users run, one process at a time: the trainer's own steps/s and peak memory.
S="python3 -m lra_benchmarks.study --concurrent=1 --data_dir=text:/tmp/imdb --set=num_train_steps=600 --set=eval_every=600 --set=num_eval_steps=5"
$S --tasks=text,listops --attentions=flash --workdir=/tmp/sp_flash > $OUT/sp.log 2>&1
$S --tasks=text,listops --attentions=posrf-qmc --workdir=/tmp/sp_bf16_auto --set=model.dtype=bfloat16 >> $OUT/sp.log 2>&1
$S --tasks=text --attentions=posrf-qmc --workdir=/tmp/sp_bf16_xla --set=model.dtype=bfloat16 --set=model.implementation=xla >> $OUT/sp.log 2>&1
echo "speed runs done after $(( $(date +%s) - T0 )) s"
for d in /tmp/sp_*; do echo "== $d"; sed -n '/## Efficiency/,/## Runs/p' $d/study.md; done
# 2. MQAR accuracy vs number of pairs, and the byte LM on a corpus of this repository's text.
mkdir -p /tmp/corpus; for f in docs/*.md README.md spectraformer_jax/*.py lra_benchmarks/*.py lra_benchmarks/*/*.py; do cp $f /tmp/corpus/$(echo $f | tr / _).txt; done
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.04
for p in 4 16 64; do for a in softmax posrf_orf posrf_qmc oprf_fastfoodl saderf_qmc; do
  python3 -m lra_benchmarks.train --config=configs/mqar_$a.py --workdir=/tmp/mq/$a-p$p --config.task_options.num_kv_pairs=$p --config.num_train_steps=2000 --config.warmup_steps=200 --config.eval_every=2000 --config.checkpoint_every=2000 --config.progress_bar=False --config.model.dtype=bfloat16 > /tmp/mq_$a-$p.log 2>&1 &
done; done
for a in softmax posrf_orf oprf_fastfoodl; do
  python3 -m lra_benchmarks.train --config=configs/lm_$a.py --workdir=/tmp/lm/$a --config.data_dir=/tmp/corpus --config.num_train_steps=2000 --config.eval_every=1000 --config.checkpoint_every=2000 --config.progress_bar=False --config.model.dtype=bfloat16 > /tmp/lm_$a.log 2>&1 &
done
( sleep $(( 390 - ($(date +%s) - T0) )); pkill -TERM -f lra_benchmarks.train ) & WD=$!
wait $(jobs -p | grep -v "^$WD$") 2>/dev/null; kill $WD 2>/dev/null
echo "all done after $(( $(date +%s) - T0 )) s"
python3 - <<'PY'
import json, glob, os
rows = []
for f in sorted(glob.glob('/tmp/mq/*/results.json') + glob.glob('/tmp/lm/*/results.json')):
  r = json.load(open(f)); rows.append(dict(run=f.split('/')[2] + '/' + f.split('/')[3], **{k: r.get(k) for k in ('test_accuracy', 'test_bits_per_byte', 'best_step', 'steps', 'steps_per_second', 'peak_memory_bytes', 'device_kind')}))
json.dump(rows, open(os.environ['OUT'] + '/mqar_lm.json', 'w'), indent=1)
for r in rows: print(r)
PY
for f in /tmp/mq_*.log /tmp/lm_*.log; do grep -l -i "error\|Traceback" $f && tail -n 5 $f; done
tar czf $OUT/runs.tgz --exclude=checkpoints --exclude=best --exclude=tensorboard -C /tmp sp_flash sp_bf16_auto sp_bf16_xla mq lm 2>/dev/null
