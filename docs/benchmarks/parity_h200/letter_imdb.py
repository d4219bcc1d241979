"""Synthetic aclImdb/ (real on-disk layout): each word comes from the label's letter half
(a-m for pos, n-z for neg) with probability 0.53, else from the other half."""
import os, random, sys
root = sys.argv[1]; n_train = int(sys.argv[2]); n_test = int(sys.argv[3]); r = random.Random(0)
half = {'pos': 'abcdefghijklm', 'neg': 'nopqrstuvwxyz'}
vocab = {k: [''.join(r.choice(v) for _ in range(r.randint(2, 8))) for _ in range(500)] for k, v in half.items()}
for split, n in (('train', n_train), ('test', n_test)):
  for lab in ('neg', 'pos'):
    other = 'pos' if lab == 'neg' else 'neg'
    d = os.path.join(root, 'aclImdb', split, lab); os.makedirs(d, exist_ok=True)
    for i in range(n):
      toks = [r.choice(vocab[lab] if r.random() < 0.53 else vocab[other]) for _ in range(r.randint(40, 600))]
      open(os.path.join(d, f'{i}_{r.randint(1, 10)}.txt'), 'w').write(' '.join(toks))
