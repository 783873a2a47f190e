"""Learning curves, histograms and run tables (fewshot.plots and its scripts)."""

import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from fewshot import plots
from fewshot import records as records_lib
from fewshot import run_tables
from fewshot.workdir import MetricsLog, read_metrics, write_json_atomic
from helpers import REPO
import layers_test

pytest.importorskip('matplotlib')

NAN, INF = float('nan'), float('inf')


def _write_run(workdir, records, config):
  """A workdir of `records` (step -> values, in the order written)."""
  workdir.mkdir(parents=True, exist_ok=True)
  log = MetricsLog(workdir)
  for step, values in records:
    log.write(step, **values)
  write_json_atomic(workdir / 'config.json', config)
  return workdir


def _single(tmp_path, name='single', lr=1e-3, test=True):
  """A one-head run: train every 5 steps, val every 10 (with a NaN loss at
  step 15 and val_ci95 Infinity at 20); step 20 logged twice, as after a
  resume (the later values win)."""
  records = []
  for step in (5, 10, 15, 20):
    records.append((step, dict(train_loss=NAN if step == 15 else 2.0 / step,
                               train_accuracy=step / 40,
                               episodes_per_second=50.0)))
    if step % 10 == 0:
      records.append((step, dict(val_accuracy=0.4 + step / 100,
                                 val_ci95=INF if step == 20 else 0.05)))
  # Resumed from step 10: steps 15 and 20 again, with other values.
  records += [(15, dict(train_loss=0.25, train_accuracy=0.45)),
              (20, dict(train_loss=0.2, train_accuracy=0.5)),
              (20, dict(val_accuracy=0.62, val_ci95=0.04))]
  if test:
    records.append((20, dict(test_accuracy=0.6, test_ci95=0.03)))
  config = {'seed': 0, 'optimizer': {'name': 'adam', 'learning_rate': lr},
            'data': {'num_classes': [30, 10, 10]}}
  return _write_run(tmp_path / name, records, config)


def _multitask(tmp_path):
  records = [(10, dict(train_loss=1.0, train_digits_loss=0.4,
                       train_letters_loss=0.6)),
             (10, dict(val_digits_accuracy=0.7, val_digits_ci95=0.02,
                       val_letters_accuracy=0.5, val_letters_ci95=0.03,
                       val_age_mse=0.25, val_age_mse_ci95=0.01)),
             (20, dict(train_loss=0.5, train_digits_loss=0.2,
                       train_letters_loss=0.3)),
             (20, dict(val_digits_accuracy=0.8, val_digits_ci95=0.02,
                       val_letters_accuracy=NAN, val_letters_ci95=0.03,
                       val_age_mse=0.2, val_age_mse_ci95=0.01))]
  return _write_run(tmp_path / 'multi', records, {'seed': 0})


def _by_gid(figure):
  artists = {}
  for ax in figure.axes:
    for artist in list(ax.get_lines()) + list(ax.collections):
      if artist.get_gid():
        artists[artist.get_gid()] = (ax, artist)
  return artists


def test_metric_series_keeps_the_last_value_per_step(tmp_path):
  records = read_metrics(_single(tmp_path))
  steps, values = records_lib.metric_series(records, 'train_loss')
  np.testing.assert_array_equal(steps, [5, 10, 15, 20])
  np.testing.assert_allclose(values, [0.4, 0.2, 0.25, 0.2])
  steps, values = records_lib.metric_series(records, 'val_ci95')
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_allclose(values, [0.05, 0.04])  # Infinity overwritten
  assert records_lib.final_value(records, 'val_accuracy') == pytest.approx(0.62)
  assert records_lib.final_value(records, 'missing') is None


def test_curves_lines_and_band_hold_the_records(tmp_path):
  workdir = _write_run(tmp_path / 'nonfinite', [
      (5, dict(train_loss=1.0)), (10, dict(train_loss=NAN)),
      (15, dict(train_loss=0.5)),
      (10, dict(val_accuracy=0.5, val_ci95=0.1)),
      (20, dict(val_accuracy=0.6, val_ci95=INF)),
      (30, dict(val_accuracy=0.7, val_ci95=0.05))], {})
  figure = plots.curves([('a', read_metrics(workdir))])
  titles = [ax.get_title() for ax in figure.axes]
  assert titles == ['Training loss', 'Validation accuracy (band: 95% CI)']
  artists = _by_gid(figure)
  _, loss = artists['a|train_loss']
  np.testing.assert_array_equal(loss.get_xdata(), [5, 15])  # NaN dropped
  np.testing.assert_allclose(loss.get_ydata(), [1.0, 0.5])
  _, val = artists['a|val_accuracy']
  np.testing.assert_array_equal(val.get_xdata(), [10, 20, 30])
  np.testing.assert_allclose(val.get_ydata(), [0.5, 0.6, 0.7])
  # The band leaves out step 20 (its CI is infinite) and spans mean ± ci.
  _, band = artists['a|val_ci95']
  vertices = band.get_paths()[0].vertices
  assert set(np.round(vertices[:, 0], 6)) == {10, 30}
  for step, low, high in ((10, 0.4, 0.6), (30, 0.65, 0.75)):
    ys = vertices[np.isclose(vertices[:, 0], step), 1]
    assert ys.min() == pytest.approx(low) and ys.max() == pytest.approx(high)
  legend = [t.get_text() for t in figure.legends[0].get_texts()]
  assert legend == ['a (2 non-finite values skipped)']


def test_curves_draw_the_later_record_of_a_resumed_step(tmp_path):
  figure = plots.curves([('run', read_metrics(_single(tmp_path)))])
  assert [ax.get_title() for ax in figure.axes] == [
      'Training loss', 'Training accuracy',
      'Validation accuracy (band: 95% CI)']
  artists = _by_gid(figure)
  np.testing.assert_allclose(artists['run|train_loss'][1].get_ydata(),
                             [0.4, 0.2, 0.25, 0.2])
  np.testing.assert_allclose(artists['run|val_accuracy'][1].get_ydata(),
                             [0.5, 0.62])
  # Every run's metrics and nothing else: no test lines, no rates.
  assert sorted(artists) == ['run|train_accuracy', 'run|train_loss',
                             'run|val_accuracy', 'run|val_ci95']
  assert [t.get_text() for t in figure.legends[0].get_texts()] == ['run']


def test_curves_of_several_runs_and_names(tmp_path):
  single, multi = _single(tmp_path), _multitask(tmp_path)
  figure = plots.curves([('one', read_metrics(single)),
                         ('many', read_metrics(multi))])
  titles = [ax.get_title() for ax in figure.axes]
  assert titles == ['Training loss', 'Training accuracy',
                    'Validation accuracy (band: 95% CI)',
                    'Validation MSE (band: 95% CI)']
  artists = _by_gid(figure)
  one, many = (artists['one|val_accuracy'][1],
               artists['many|val_digits_accuracy'][1])
  assert one.get_color() != many.get_color()  # a colour per run
  letters = artists['many|val_letters_accuracy'][1]
  assert letters.get_color() == many.get_color()
  assert letters.get_linestyle() != many.get_linestyle()  # a style per name
  np.testing.assert_array_equal(letters.get_xdata(), [10])  # NaN dropped
  val_ax = artists['many|val_letters_accuracy'][0]
  assert val_ax is artists['one|val_accuracy'][0]
  names = [t.get_text() for t in val_ax.get_legend().get_texts()]
  assert names == ['accuracy', 'digits', 'letters']
  mse_ax, mse = artists['many|val_age_mse']
  assert mse_ax.get_title().startswith('Validation MSE')
  np.testing.assert_allclose(mse.get_ydata(), [0.25, 0.2])
  assert 'many|val_age_mse_ci95' in artists
  legend = [t.get_text() for t in figure.legends[0].get_texts()]
  assert legend == ['one',  # its NaN and Infinity were logged over
                    'many (1 non-finite value skipped)']


def test_curves_without_metrics_fail_clearly():
  with pytest.raises(ValueError, match='No training or validation'):
    plots.curves([('empty', [{'step': 1, 'time': 0.0}])])


def test_plot_script_writes_a_png(tmp_path):
  single, multi = _single(tmp_path), _multitask(tmp_path)
  output = tmp_path / 'curves.png'
  result = subprocess.run(
      [sys.executable, str(REPO / 'experiments' / 'plot.py'), '--workdir',
       str(single), str(multi), '--output', str(output), '--labels', 'a,b',
       '--dpi', '50'], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  with Image.open(output) as image:
    image.load()
    # Four panels of 4.8 x 3.6 inches at 50 dpi.
    assert image.size == (4 * 240, 180)
    assert image.format == 'PNG'


def test_accuracy_histogram_marks_mean_and_ci(tmp_path):
  accuracies = np.array([0.6, 0.8, 0.8, 1.0, 0.4, 0.8, 0.6, 1.0])
  figure = plots.accuracy_histogram(accuracies, ci95=0.1, title='t')
  (ax,) = figure.axes
  heights = {round(p.get_x() + p.get_width() / 2, 6): p.get_height()
             for p in ax.patches if p.get_gid() == 'episodes'
             and p.get_height()}
  # One bar per value on the 0.2 grid, none lost between bins.
  assert heights == {0.4: 1, 0.6: 2, 0.8: 3, 1.0: 2}
  artists = {a.get_gid(): a for a in list(ax.get_lines()) + ax.patches}
  mean = accuracies.mean()
  np.testing.assert_allclose(artists['mean'].get_xdata(), [mean, mean])
  xs = artists['ci95'].get_path().transformed(
      artists['ci95'].get_patch_transform()).vertices[:, 0]
  assert xs.min() == pytest.approx(mean - 0.1)
  assert xs.max() == pytest.approx(mean + 0.1)
  assert ax.get_title() == 't'
  path = tmp_path / 'hist.png'
  figure.savefig(path)
  with Image.open(path) as image:
    image.load()
    assert image.size == (600, 400)
  # The default CI is the library's; the title says it.
  default = plots.accuracy_histogram(accuracies)
  assert f'{100 * mean:.2f}%' in default.axes[0].get_title()


def test_per_episode_accuracies_of_the_few_shot_evaluator():
  from fewshot.algorithms import protonet  # pylint: disable=g-import-not-at-top
  from fewshot.backbones.base import identity_backbone  # pylint: disable=g-import-not-at-top
  from fewshot.data import sampling  # pylint: disable=g-import-not-at-top
  from fewshot.data.dataset import ClassDataset  # pylint: disable=g-import-not-at-top
  from fewshot.evaluators import (FewShotLearner, episode_accuracies,  # pylint: disable=g-import-not-at-top
                                  few_shot_evaluator)
  # Pixels as features (no backbone to compile): 6 noisy classes.
  labels = np.repeat(np.arange(6), 4).astype(np.int32)
  noise = np.random.default_rng(0).normal(0, 40, (24, 2, 2, 1))
  images = np.clip(labels[:, None, None, None] * 40 + noise, 0, 255)
  dataset = ClassDataset(images.astype(np.uint8), labels,
                         tuple(map(str, range(6))))
  algorithm = protonet(identity_backbone())
  params, state = algorithm.init(jax.random.key(0), dataset.images[:2])
  spec, key = sampling.EpisodeSpec(3, 1, 2), jax.random.key(3)
  evaluate = few_shot_evaluator(FewShotLearner(algorithm, lambda p: p),
                                dataset, spec, 8, key)
  summary = evaluate(params, state, per_episode=True)
  expected = jax.jit(episode_accuracies(algorithm, spec, 8))(
      params, state, sampling.to_device(dataset), key)
  np.testing.assert_allclose(summary['accuracies'], expected, atol=1e-6)
  assert len(set(summary['accuracies'])) > 1  # not a constant
  assert summary['accuracy'] == pytest.approx(np.mean(expected))
  assert 'accuracies' not in evaluate(params, state)  # logged summaries


def test_per_episode_needs_a_few_shot_evaluator():
  from fewshot.evaluators.workdir import evaluate_workdir  # pylint: disable=g-import-not-at-top
  from fewshot.experiment import Experiment  # pylint: disable=g-import-not-at-top
  experiment = Experiment(None, None, None, None, None,
                          {'test': lambda params, state: {}}, None, 0, {})
  with pytest.raises(ValueError, match='Per-episode accuracies'):
    evaluate_workdir(experiment, None, per_episode=True)


def _table(tmp_path, *workdirs):
  result = subprocess.run(
      [sys.executable, str(REPO / 'experiments' / 'summarize.py'),
       *map(str, workdirs)], capture_output=True, text=True, timeout=60)
  return result


def test_summarize_prints_one_row_per_run(tmp_path):
  a = _single(tmp_path, 'a', lr=1e-3)
  b = _single(tmp_path, 'b', lr=3e-3, test=False)
  result = _table(tmp_path, a, b)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  assert header == ['run', 'step', 'val accuracy (%)', 'test accuracy (%)',
                    'wall time', 'optimizer.learning_rate']
  assert set(lines[1].replace('|', '')) == {'-'}
  rows = [[c.strip() for c in line.strip('|').split('|')]
          for line in lines[2:]]
  assert len(rows) == 2
  assert rows[0][:4] == ['a', '20', '62.00 ± 4.00', '60.00 ± 3.00']
  assert rows[1][:4] == ['b', '20', '62.00 ± 4.00', '—']  # no test results
  assert [r[5] for r in rows] == ['0.001', '0.003']
  assert all(re.fullmatch(r'\d+s', r[4]) for r in rows)  # seconds


def test_runs_table_of_named_metrics_and_wall_time(tmp_path):
  records = read_metrics(_multitask(tmp_path))
  for i, record in enumerate(records):  # 2.5 hours, first to last
    record['time'] = 1000.0 + 3000.0 * i
  rows = run_tables.runs_table([('multi', records, {'seed': 0}),
                           ('other', records, {'seed': 1, 'extra': [1, 2]})])
  header, first, second = rows
  assert header == ['run', 'step', 'val age mse', 'val digits (%)',
                    'val letters (%)', 'wall time', 'extra', 'seed']
  assert first == ['multi', '20', '0.2000 ± 0.0100', '80.00 ± 2.00',
                   'NaN', '2h30m', '—', '0']
  assert second[-2:] == ['(1, 2)', '1']
  markdown = run_tables.markdown_table(rows)
  assert markdown.count('\n') == 3


def test_summarize_names_a_missing_workdir(tmp_path):
  result = _table(tmp_path, _single(tmp_path), tmp_path / 'nowhere')
  assert result.returncode != 0
  assert 'nowhere' in result.stderr and 'no such directory' in result.stderr


def test_plots_module_stays_a_reader():
  # Beside fewshot.workdir: it takes records, so it never needs the
  # builder's ml_collections nor orbax, even indirectly.
  seen, frontier = set(), ['fewshot.plots']
  while frontier:
    module = frontier.pop()
    for target in layers_test.GRAPH.get(module, ()):
      assert not target.startswith(('ml_collections', 'orbax',
                                    'fewshot.workdir', 'fewshot.builder',
                                    'fewshot.harness')), (module, target)
      if target.startswith('fewshot.') and target not in seen:
        seen.add(target)
        frontier.append(target)
  assert 'fewshot.stats' in seen
  assert math.isfinite(records_lib.final_value([{'step': 1, 'x': 2.0}], 'x'))
