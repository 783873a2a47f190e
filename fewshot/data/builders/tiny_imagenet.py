"""TFDS builder `fewshot_tiny_imagenet`: Tiny-ImageNet-200 training images.

Reads `<manual_dir>/tiny-imagenet/tiny-imagenet-200-train.zip` (or the full
release `tiny-imagenet-200.zip`, of which only `train/` is used) with `zipfile`,
without extraction or TensorFlow. ImageNet's terms (non-commercial research and
education) forbid redistribution, so there is no automatic download.

Split `train`: 200 classes x 500 images.
Features:
  image: `[64, 64, 3]` uint8 RGB. RGB JPEGs are stored as they are; the few
    grayscale (or CMYK) ones are converted to RGB and stored as lossless PNG,
    so the stored bytes are JPEG or PNG (`encoding_format=None`; decoders detect
    the format).
  label: ClassLabel whose names are the 200 wnids, sorted.
Metadata: `info.metadata['descriptions']` maps each wnid to its words.txt
entry (e.g. 'n01443537' -> 'goldfish, Carassius auratus').
"""

from __future__ import annotations

import io
import pathlib
import re
import zipfile
from typing import Any, Iterator

from PIL import Image
import tensorflow_datasets as tfds

from fewshot.data import sources

_HOMEPAGE = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
MANUAL_SUBDIR = 'tiny-imagenet'
ARCHIVE_NAMES = ('tiny-imagenet-200-train.zip', 'tiny-imagenet-200.zip')
ROOT = 'tiny-imagenet-200'
IMAGE_SIZE = 64

_IMAGE_RE = re.compile(
    rf'{ROOT}/train/(?P<wnid>[^/]+)/images/(?P<file>[^/]+\.jpe?g)',
    re.IGNORECASE)


def _not_found(problem: str, manual_dir: Any = None) -> FileNotFoundError:
  return sources.not_found(
      'Tiny-ImageNet', problem, subdir=MANUAL_SUBDIR,
      files=[ARCHIVE_NAMES], manual_dir=manual_dir,
      origin=f'{_HOMEPAGE}; it is never downloaded, ImageNet terms')


def find_archive(manual_dir: Any) -> Any:
  """The zip in `<manual_dir>/tiny-imagenet/`; a clear error if absent."""
  if manual_dir is None:
    raise _not_found('no manual dir is set')
  folder = manual_dir / MANUAL_SUBDIR
  for name in ARCHIVE_NAMES:
    if (folder / name).exists():
      return folder / name
  raise _not_found(f'{folder}/ has neither {" nor ".join(ARCHIVE_NAMES)}',
                   manual_dir)


def read_class_info(path: Any) -> tuple[list[str], dict[str, str],
                                        dict[str, list[str]]]:
  """Reads and checks the zip's layout.

  Returns:
    (sorted wnids, wnid -> words.txt description, wnid -> sorted zip members
    of its training images).

  Raises:
    ValueError: `wnids.txt` or `words.txt` is missing, or the training images
      are not `tiny-imagenet-200/train/<wnid>/images/*.JPEG` for exactly the
      wnids of wnids.txt.
  """
  expected = (f'{ROOT}/wnids.txt, {ROOT}/words.txt and '
              f'{ROOT}/train/<wnid>/images/*.JPEG')
  try:
    zf = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f'Tiny-ImageNet archive {path} is not a zip file ({e}); '
                     f'expected a zip with {expected}.') from e
  with zf:
    members = zf.namelist()
    for name in ('wnids.txt', 'words.txt'):
      if f'{ROOT}/{name}' not in members:
        raise ValueError(
            f'Unexpected layout in Tiny-ImageNet archive {path}: no '
            f'{ROOT}/{name}; expected {expected}.')
    wnids = sorted(set(zf.read(f'{ROOT}/wnids.txt').decode().split()))
    words = {}
    for line in zf.read(f'{ROOT}/words.txt').decode().splitlines():
      wnid, _, text = line.partition('\t')
      words[wnid.strip()] = text.strip()
  images: dict[str, list[str]] = {w: [] for w in wnids}
  for member in members:
    match = _IMAGE_RE.fullmatch(member)
    if match is None:
      continue
    if match['wnid'] not in images:
      raise ValueError(
          f'Unexpected layout in Tiny-ImageNet archive {path}: {member!r} '
          f'belongs to a class that is not in {ROOT}/wnids.txt.')
    images[match['wnid']].append(member)
  empty = [w for w, m in images.items() if not m]
  if empty:
    raise ValueError(
        f'Unexpected layout in Tiny-ImageNet archive {path}: no training '
        f'images for {len(empty)} wnids of wnids.txt (e.g. {empty[0]}); '
        f'expected {expected}.')
  descriptions = {w: words.get(w, '') for w in wnids}
  return wnids, descriptions, {w: sorted(m) for w, m in images.items()}


def _image_bytes(data: bytes, where: str) -> bytes:
  """Original bytes if a 64x64 RGB JPEG, else the image as an RGB PNG."""
  with Image.open(io.BytesIO(data)) as image:
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
      raise ValueError(f'{where}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} image, '
                       f'got {image.size[0]}x{image.size[1]}.')
    if image.mode == 'RGB' and image.format == 'JPEG':
      return data
    buffer = io.BytesIO()
    image.convert('RGB').save(buffer, format='PNG')
  return buffer.getvalue()


class FewshotTinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny-ImageNet-200 training split (Stanford CS231n), 64x64 RGB."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: the training split.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Put `{ARCHIVE_NAMES[0]}` (or the full `{ARCHIVE_NAMES[1]}` from {_HOMEPAGE})
  in `<manual_dir>/{MANUAL_SUBDIR}/`.
  """

  @classmethod
  def check_sources(cls, manual_dir: str | None) -> None:
    """Fails fast, naming the files, when the manual dir lacks the zip."""
    find_archive(None if manual_dir is None else pathlib.Path(manual_dir))

  def _info(self) -> tfds.core.DatasetInfo:
    # Not `dataset_info_from_configs`: this folder holds several builders.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Tiny-ImageNet-200 training images: 200 ImageNet classes x 500 '
            '64x64 RGB images (Stanford CS231n).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            'label': tfds.features.ClassLabel(),  # Names set from the zip.
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.kaggle.com/c/tiny-imagenet',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:
      raise _not_found(f'no usable manual dir ({str(e).splitlines()[0]})'
                       ) from e
    path = find_archive(manual_dir)
    wnids, descriptions, images = read_class_info(path)
    self.info.features['label'].names = wnids
    self.info.metadata['descriptions'] = descriptions
    self.info.metadata['archive'] = path.name
    return {'train': self._generate_examples(path, images)}

  def _generate_examples(self, path: Any, images: dict[str, list[str]]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    with zipfile.ZipFile(path) as zf:
      for wnid, members in images.items():
        for member in members:
          yield member, {
              'image': _image_bytes(zf.read(member), f'{path}:{member}'),
              'label': wnid,
          }
