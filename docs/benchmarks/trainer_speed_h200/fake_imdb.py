import os, random, sys
root = sys.argv[1]; n = int(sys.argv[2]); r = random.Random(0)
words = [''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(r.randint(2, 9))) for _ in range(3000)]
for split in ('train', 'test'):
  for lab in ('neg', 'pos'):
    d = os.path.join(root, 'aclImdb', split, lab); os.makedirs(d, exist_ok=True)
    for i in range(n):
      text = ' '.join(r.choice(words) for _ in range(r.randint(40, 900)))
      open(os.path.join(d, f'{i}_{r.randint(1, 10)}.txt'), 'w').write(text)
