"""seqio Tasks and Mixtures as pretraining sources.

seqio pulls in tensorflow (seconds to import, gigabytes of address space), so it is imported only
inside these functions: a run that reads plain files never loads it.
"""

import functools

from lmtrain.data import formats
from lmtrain.errors import UserError


def _text_dataset_fn(files, split, shuffle_files, seed=None):
  """A tf.data dataset of {"text"} read through our validating record readers."""
  del split, shuffle_files, seed  # One split; order is the pipeline's business.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  texts = [text for path in files for text in formats.iter_text_records(path)]
  return tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts, tf.string)})


def register_text_task(name: str, files: list[str], tokenizer_path: str):
  """Registers (or replaces) a seqio Task `name` over text/JSONL/array_record files.

  Its output feature "targets" holds the tokenized text with EOS appended.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from lmtrain.data import tokenizer  # pylint: disable=g-import-not-at-top
  vocabulary = tokenizer.seqio_vocabulary(tokenizer_path)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          dataset_fn=functools.partial(_text_dataset_fn, list(files)), splits=["train"]),
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos,
      ],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=True)},
  )


def seqio_documents(name: str, split: str = "train"):
  """Yields the text of each example of a registered seqio Task or Mixture, in order.

  A Mixture yields all examples of each of its Tasks in turn: the pipeline shuffles documents
  itself, so mixing rates are not applied. Uses the raw "text" when the examples keep it,
  otherwise decodes the token ids of "targets".
  """
  import seqio  # pylint: disable=g-import-not-at-top
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise UserError(f"seqio:{name}: not a registered Task or Mixture") from e
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for task in tasks:
    if split not in task.splits:
      raise UserError(f"seqio:{name}: Task {task.name} has no split {split!r} "
                      f"(has {sorted(task.splits)})")
    vocabulary = task.output_features["targets"].vocabulary
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
    for example in dataset.as_numpy_iterator():
      value = example.get("text", example["targets"])
      if isinstance(value, bytes):
        yield value.decode("utf-8")
      else:
        yield vocabulary.decode([int(i) for i in value if i != vocabulary.eos_id])
