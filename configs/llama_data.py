"""The LLaMA paper's pre-training data (Table 1) as a `data.mixture`, for the paper configs.

Each source names the folder its documents were prepared into under data.data_dir:

  python -m llama_jax.data.prepare --input=gs://BUCKET/redpajama/c4 --output=DATA_DIR/c4

or is mapped to other data with --config.data.mixture.c4.dataset=c4/en:3.1.0. Table 1 gives
each source's share of the training *tokens* (CommonCrawl 67.0%, C4 15.0%, GitHub 4.5%,
Wikipedia 4.5%, Books 4.5%, ArXiv 2.5%, StackExchange 2.0%); the weights here draw
*documents*, so to match the paper's token shares set each weight to its share divided by
the source's mean tokens per document (books are long: their weight drops the most).
"""

import ml_collections

TABLE_1 = {  # source: percent of the training tokens
    'commoncrawl': 67.0,
    'c4': 15.0,
    'github': 4.5,
    'wikipedia': 4.5,
    'books': 4.5,
    'arxiv': 2.5,
    'stackexchange': 2.0,
}


def mixture() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      name: {
          'dataset': f'prepared:{name}',
          'weight': percent
      } for name, percent in TABLE_1.items()
  })
