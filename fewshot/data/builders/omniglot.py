"""TFDS builder `fewshot_omniglot`: Omniglot read from its release zips.

TFDS's own `omniglot` builder needs TensorFlow to prepare (it walks extracted
folders with `tf.io.gfile`) and stores 3-channel images. This builder reads the
four original zips with `zipfile` (no extraction) and needs no TensorFlow:

* Offline, it reads them from `<manual_dir>/omniglot/<set>.zip` (for example
  `tfds.download.DownloadConfig(manual_dir='../shared/data')`).
* Online, when `<manual_dir>/omniglot/` does not exist, it downloads them from
  github.com/brendenlake/omniglot (`python/` folder) through the TFDS download
  manager, which checks the registered sizes and SHA-256 checksums. The host
  is probed first, so offline it fails in seconds, not after minutes of
  retries.
* `check_sources` (called by `fewshot.data.tfds_loading.get_builder`) fails
  at once when a manual dir was given but lacks the zips.

Splits: `train` (images_background, 30 alphabets, 964 characters, 19,280
images), `test` (images_evaluation, 20 alphabets, 659 characters, 13,180
images), `small1` and `small2` (the two "minimal" background subsets, 5
alphabets each; Greek and Latin are in both).

Features, one example per drawing:
  image: `[105, 105, 1]` uint8, exactly 0 (stroke) or 255 (background). The
    release PNGs are 1-bit, which decoders turn into 0/1 or 0/255; they are
    converted with PIL's `convert('L')` and re-encoded as 8-bit PNGs, so every
    decoder gives 0/255.
  alphabet: ClassLabel over the 50 alphabet names (background alphabets sorted,
    then evaluation alphabets sorted).
  alphabet_char_id: int64, the character's index within its alphabet
    (`character01` -> 0).
  label: ClassLabel over the 1,623 characters, named `<alphabet>/character<NN>`,
    the same index in every split (the small sets reuse the background labels).
    Order: background characters (sorted by alphabet, then number), then
    evaluation characters, so `train` uses labels `[0, 964)` and `test`
    `[964, 1623)`.
"""

from __future__ import annotations

import dataclasses
import io
import re
import zipfile
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as checksums_lib

from fewshot.data import sources

_HOMEPAGE = 'https://github.com/brendenlake/omniglot'
_URL = _HOMEPAGE + '/raw/master/python/'
_CITATION = """\
@article{lake2015human,
  title={Human-level concept learning through probabilistic program induction},
  author={Lake, Brenden M and Salakhutdinov, Ruslan and Tenenbaum, Joshua B},
  journal={Science},
  volume={350},
  number={6266},
  pages={1332--1338},
  year={2015},
}
"""

MANUAL_SUBDIR = 'omniglot'
IMAGE_SIZE = 105

# Split name -> archive stem (also the top-level folder inside the zip).
SPLIT_ARCHIVES: dict[str, str] = {
    'train': 'images_background',
    'test': 'images_evaluation',
    'small1': 'images_background_small1',
    'small2': 'images_background_small2',
}

# Size in bytes and SHA-256 of the original release files on GitHub.
_RELEASE_CHECKSUMS: dict[str, tuple[int, str]] = {
    'images_background':
        (9464212,
         'ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640'),
    'images_evaluation':
        (6462886,
         '1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee'),
    'images_background_small1':
        (1319022,
         'f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4'),
    'images_background_small2':
        (1580917,
         '3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f'),
}

ARCHIVE_FILES = tuple(f'{stem}.zip' for stem in SPLIT_ARCHIVES.values())

_CHARACTER_RE = re.compile(r'character(\d+)')
_IMAGE_RE = re.compile(r'\d+_\d+\.png')


@dataclasses.dataclass(frozen=True)
class Drawing:
  """One drawing inside a release zip."""
  member: str  # Path inside the zip.
  alphabet: str
  character: str  # 'character<NN>'.

  @property
  def label_name(self) -> str:
    return f'{self.alphabet}/{self.character}'

  @property
  def char_id(self) -> int:
    return int(self.character[len('character'):]) - 1


def _is_ignored(member: str) -> bool:
  """Folder entries and OS clutter (`__MACOSX/`, `.DS_Store`)."""
  base = member.rstrip('/').rsplit('/', 1)[-1]
  return (member.endswith('/') or member.startswith('__MACOSX/') or
          base.startswith('.'))


def list_archive(path: Any, set_name: str) -> list[Drawing]:
  """Checks the layout of one release zip and lists its drawings, sorted.

  Args:
    path: the zip (a path or an open binary file).
    set_name: the expected top-level folder, e.g. `images_background`.

  Returns:
    One entry per `<set_name>/<alphabet>/character<NN>/<id>_<drawer>.png`.

  Raises:
    ValueError: the zip holds anything else, or no drawing at all.
  """
  expected = f'{set_name}/<alphabet>/character<NN>/<id>_<drawer>.png'
  try:
    with zipfile.ZipFile(path) as zf:
      members = zf.namelist()
  except zipfile.BadZipFile as e:
    raise ValueError(f'Omniglot archive {path} is not a zip file ({e}); '
                     f'expected a zip of {expected!r}.') from e
  entries = []
  for member in members:
    if _is_ignored(member):
      continue
    parts = member.split('/')
    if (len(parts) != 4 or parts[0] != set_name or not parts[1] or
        not _CHARACTER_RE.fullmatch(parts[2]) or
        not _IMAGE_RE.fullmatch(parts[3])):
      raise ValueError(
          f'Unexpected layout in Omniglot archive {path}: found {member!r}, '
          f'expected every file to be {expected!r}.')
    entries.append(Drawing(member, parts[1], parts[2]))
  if not entries:
    raise ValueError(
        f'Omniglot archive {path} holds no drawings; expected files '
        f'{expected!r}.')
  entries.sort(key=lambda e: (e.alphabet, e.char_id, e.member))
  return entries


def _ordered_unique(items) -> list[str]:
  return list(dict.fromkeys(items))


def label_names(entries_by_split: Mapping[str, list[Drawing]]
                ) -> tuple[list[str], list[str]]:
  """Global (alphabet names, character names), in split order train, test, ...

  Within a split, names follow the sorted entries (alphabet, then number).
  """
  alphabets, characters = [], []
  for split in SPLIT_ARCHIVES:
    entries = entries_by_split[split]
    alphabets.extend(e.alphabet for e in entries)
    characters.extend(e.label_name for e in entries)
  return _ordered_unique(alphabets), _ordered_unique(characters)


def _decode_binary_png(data: bytes, where: str) -> bytes:
  """Release PNG bytes -> 8-bit grayscale PNG bytes with values 0/255."""
  with Image.open(io.BytesIO(data)) as image:
    gray = image.convert('L')
  if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f'{where}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} image, '
                     f'got {gray.size[0]}x{gray.size[1]}.')
  histogram = gray.histogram()
  if any(histogram[1:255]):
    raise ValueError(f'{where}: expected a black-and-white image (0/255 after '
                     "convert('L')), found gray levels.")
  buffer = io.BytesIO()
  gray.save(buffer, format='PNG')
  return buffer.getvalue()


def _manual_dir_or_none(dl_manager: tfds.download.DownloadManager):
  """The manual dir, or None when it is absent or empty."""
  try:
    return dl_manager.manual_dir
  except AssertionError:
    return None


class FewshotOmniglot(tfds.core.GeneratorBasedBuilder):
  """Omniglot (Lake et al. 2015) with single-channel 0/255 images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: 4 splits read from the original zips.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Optional. To prepare offline, put the four release zips in
  `<manual_dir>/{MANUAL_SUBDIR}/`: {', '.join(
      f'{v}.zip' for v in SPLIT_ARCHIVES.values())}
  (from {_URL}). Without that folder they are downloaded.
  """

  @classmethod
  def check_sources(cls, manual_dir: str | None) -> None:
    """Fails fast, naming the files, when the zips cannot be had.

    Args:
      manual_dir: the manual dir the user gave (None: none given). Given, it
        must hold `omniglot/<set>.zip` for the four sets; not given, the
        download host must answer a connect within a few seconds.

    Raises:
      FileNotFoundError: neither holds.
    """
    if manual_dir is not None:
      sources.check_manual_files('Omniglot', manual_dir, subdir=MANUAL_SUBDIR,
                                 files=ARCHIVE_FILES, origin=_URL)
    else:
      sources.check_online('Omniglot', _URL, subdir=MANUAL_SUBDIR,
                           files=ARCHIVE_FILES)

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> dict[str, checksums_lib.UrlInfo]:
    """Registered sizes and checksums of the release zips (no .tsv needed)."""
    return {
        f'{_URL}{stem}.zip': checksums_lib.UrlInfo(
            size=tfds.core.utils.Size(size), checksum=sha256,
            filename=f'{stem}.zip')
        for stem, (size, sha256) in _RELEASE_CHECKSUMS.items()
    }

  def _info(self) -> tfds.core.DatasetInfo:
    # Not `dataset_info_from_configs`: this folder holds several builders.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Omniglot: 1,623 handwritten characters from 50 alphabets, 20 '
            'drawings each (Lake et al. 2015); single-channel 0/255 images.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format='png'),
            # Names are read from the archives in `_split_generators` and
            # stored with the prepared data.
            'alphabet': tfds.features.ClassLabel(),
            'alphabet_char_id': np.int64,
            'label': tfds.features.ClassLabel(),
        }),
        supervised_keys=('image', 'label'),
        homepage=_HOMEPAGE,
        citation=_CITATION,
    )

  def _archive_paths(self, dl_manager: tfds.download.DownloadManager
                     ) -> dict[str, Any]:
    """Split -> zip: from `<manual_dir>/omniglot/` if it exists, else online."""
    manual_dir = _manual_dir_or_none(dl_manager)
    folder = manual_dir / MANUAL_SUBDIR if manual_dir is not None else None
    if folder is not None and folder.exists():
      # A folder that exists must hold all four (or be removed to download).
      sources.check_manual_files('Omniglot', manual_dir, subdir=MANUAL_SUBDIR,
                                 files=ARCHIVE_FILES, origin=_URL)
      return {split: folder / f'{stem}.zip'
              for split, stem in SPLIT_ARCHIVES.items()}
    # Offline, the download manager retries for minutes: probe first.
    sources.check_online('Omniglot', _URL, subdir=MANUAL_SUBDIR,
                         files=ARCHIVE_FILES, manual_dir=manual_dir)
    urls = {split: f'{_URL}{stem}.zip'
            for split, stem in SPLIT_ARCHIVES.items()}
    try:
      return dl_manager.download(urls)
    except Exception as e:  # pylint: disable=broad-except
      raise sources.not_found(
          'Omniglot', f'the download from {_URL} failed ({e!r})',
          subdir=MANUAL_SUBDIR, files=ARCHIVE_FILES,
          manual_dir=manual_dir) from e

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = self._archive_paths(dl_manager)
    entries = {split: list_archive(paths[split], SPLIT_ARCHIVES[split])
               for split in SPLIT_ARCHIVES}
    alphabets, characters = label_names(entries)
    self.info.features['alphabet'].names = alphabets
    self.info.features['label'].names = characters
    return {
        split: self._generate_examples(paths[split], entries[split])
        for split in SPLIT_ARCHIVES
    }

  def _generate_examples(self, path: Any, entries: list[Drawing]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    with zipfile.ZipFile(path) as zf:
      for entry in entries:
        image = _decode_binary_png(zf.read(entry.member),
                                   f'{path}:{entry.member}')
        yield entry.member, {
            'image': image,
            'alphabet': entry.alphabet,
            'alphabet_char_id': entry.char_id,
            'label': entry.label_name,
        }
