"""Input data: grain sources and pipelines for the trainers and evaluators.

  images.py        read any image into RGB (ImageReadError otherwise), ADM centre crop, [-1, 1] <-> uint8
  sources.py       ImageFolderSource, TfdsSource, ShapesSource (random access, picklable)
  array_record.py  write_array_record / ArrayRecordSource: our msgpack-per-record files
  token_shards.py  the image-token shard format (manifest, TokenizedSource) `tokenize` writes, t2i reads
  transforms.py    ADM random-resized crop, centre crop, flip, normalise
  decode.py        robust decoding: convert what can be converted, replace/flag and count the rest
  replacement.py   which record replaces an unusable one in training (skip_budget), the check before training
  paths.py         paths named in data files stay under their root (absolute and '..' paths refused)
  steps.py         the pipeline's picklable grain steps
  pipeline.py      make_dataset(config.data, ...), to_global_batch, image_stats, count_images, preview_images
  text.py          text tokenizers (builtin:shapes, builtin:shapes_chat, AutoTokenizer; sentencepiece for Llama
                   prompts) and the t2i prefix (PromptEncoder)
  conversation.py  chat templates and label masks; llava.py: LLaVA JSONL records

Submodules are imported explicitly (``from tokenflow_jax.data import pipeline``) so that reading an image
does not pull in grain or TFDS.
"""
