"""seqio Tasks and Mixtures: pretraining sources, and SFT records as a Task.

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


def _sft_dataset_fn(files, template, split, shuffle_files, seed=None):
  """A tf.data dataset of {"inputs": prompt text, "targets": response text} of SFT records."""
  del split, shuffle_files, seed
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from lmtrain.data import sft  # pylint: disable=g-import-not-at-top
  examples = [example for path in files for example in sft.iter_sft_records(path)]
  inputs = ["".join(text for text, _ in template.runs(e.prompt_turns, generation_prompt=True))
            for e in examples]
  return tf.data.Dataset.from_tensor_slices({
      "inputs": tf.constant(inputs, tf.string),
      "targets": tf.constant([e.response for e in examples], tf.string)})


def register_sft_task(name: str, files: list[str], tokenizer_path: str, template=None):
  """Registers (or replaces) a seqio Task `name` over SFT record files (JSONL/array_record).

  "inputs" is the chat-template text up to and including the assistant prefix of the final
  assistant turn (earlier assistant turns appear without their EOS), tokenized without EOS;
  "targets" is that turn's content with EOS appended.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from lmtrain.data import sft  # pylint: disable=g-import-not-at-top
  from lmtrain.data import tokenizer  # pylint: disable=g-import-not-at-top
  vocabulary = tokenizer.seqio_vocabulary(tokenizer_path)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          dataset_fn=functools.partial(_sft_dataset_fn, list(files),
                                       template or sft.ChatTemplate()),
          splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=False),
                       "targets": seqio.Feature(vocabulary, add_eos=True)},
  )


def seqio_documents(name: str, split: str = "train"):
  """Yields the text of each example of a registered seqio Task or Mixture, in order.

  A Mixture yields all examples of each of its Tasks in turn; training mixes a Mixture's Tasks at
  its rates instead (`mixture_rates`, data/loader.py). Uses the raw "text" when the examples keep it,
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


def mixture_rates(name: str) -> list[tuple[str, float]] | None:
  """[(task name, rate)] of a registered seqio Mixture (its rates normalised to sum 1), or None
  for a Task. The loader mixes the tasks' prepared corpora at these rates."""
  import seqio  # pylint: disable=g-import-not-at-top
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise UserError(f"seqio:{name}: not a registered Task or Mixture") from e
  if not isinstance(provider, seqio.Mixture):
    return None
  rates = [(task.name, float(provider.get_rate(task))) for task in provider.tasks]
  total = sum(rate for _, rate in rates)
  if not total > 0:
    raise UserError(f"seqio:{name}: the Mixture's rates sum to {total}")
  return [(task, rate / total) for task, rate in rates]
