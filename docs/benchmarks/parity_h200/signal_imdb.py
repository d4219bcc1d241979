"""Synthetic aclImdb/ (real on-disk layout) with a planted, noisy label signal."""
import os, random, sys
root = sys.argv[1]; n_train = int(sys.argv[2]); n_test = int(sys.argv[3]); r = random.Random(0)
words = [''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(r.randint(2, 9))) for _ in range(3000)]
marks = {'pos': words[:25], 'neg': words[25:50]}; filler = words[50:]
for split, n in (('train', n_train), ('test', n_test)):
  for lab in ('neg', 'pos'):
    other = 'pos' if lab == 'neg' else 'neg'
    d = os.path.join(root, 'aclImdb', split, lab); os.makedirs(d, exist_ok=True)
    for i in range(n):
      toks = [r.choice(filler) for _ in range(r.randint(40, 700))]
      for _ in range(r.randint(1, 6)):  # markers: 70% from the label's set
        toks.insert(r.randrange(len(toks)), r.choice(marks[lab] if r.random() < 0.7 else marks[other]))
      open(os.path.join(d, f'{i}_{r.randint(1, 10)}.txt'), 'w').write(' '.join(toks))
