"""TFDS builders of the library; importing this package registers them.

`fewshot_omniglot` (`FewshotOmniglot`) and `fewshot_tiny_imagenet`
(`FewshotTinyImagenet`) prepare without TensorFlow; load them with
`fewshot.data.tfds_loading.load_class_dataset` or
`tfds.data_source(name, builder_kwargs={'file_format': 'array_record'})`.
"""

from fewshot.data.builders.omniglot import FewshotOmniglot
from fewshot.data.builders.tiny_imagenet import FewshotTinyImagenet

__all__ = ['FewshotOmniglot', 'FewshotTinyImagenet']
