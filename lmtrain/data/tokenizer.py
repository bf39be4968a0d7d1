"""SentencePiece tokenizer: training, loading, and the seqio vocabulary view.

`train_tokenizer` gives lmtrain's own models the special ids pad 0, eos 1, bos 2, unk 3. A loaded
`Tokenizer` takes its ids from the model itself, so an imported one works too: LLaMA's
sentencepiece models have unk 0, bos 1, eos 2 and no pad piece, and pad with unk instead. Every
stage reads the ids from the run's Tokenizer (never the constants below); pad != eos because RLHF
reads the reward at the EOS position and masks padding separately.
"""

import io
import os

import sentencepiece as spm

from lmtrain import fileio
from lmtrain.data import formats
from lmtrain.errors import UserError

# The special ids `train_tokenizer` gives a model.
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

# Sentencepiece drops training sentences longer than this many bytes; we feed lines, so it is ample.
_MAX_SENTENCE_BYTES = 16384


def _training_lines(input_files):
  """Yields the non-empty lines of every document, checking each file has some."""
  for path in input_files:
    found = False
    for text in formats.iter_text_records(path):
      for line in text.splitlines():
        if line.strip():
          found = True
          yield line[:_MAX_SENTENCE_BYTES // 4]  # At most 4 bytes a character.
    if not found:
      raise UserError(f"{path}: no text to train the tokenizer on")


def train_tokenizer(input_files: list[str], vocab_size: int, output_path: str) -> str:
  """Trains a byte-fallback unigram model on text/JSONL/array_record files; writes `output_path`."""
  if not input_files:
    raise UserError("tokenizer training needs at least one input file")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(list(input_files)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=0.9995,
        # Identity normalisation keeps decode(encode(text)) == text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>", unk_piece="<unk>",
        max_sentence_length=_MAX_SENTENCE_BYTES,
        # One thread and no sentence sampling make training deterministic.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise UserError(f"tokenizer training failed (vocab_size={vocab_size}): {e}") from e
  if fileio.is_remote(output_path):  # a bucket (gs://...): one object write, atomic by itself
    fileio.write_bytes(output_path, model.getvalue())
    return output_path
  parent = os.path.dirname(output_path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = f"{output_path}.{os.getpid()}.tmp"  # atomic: hosts sharing a work dir may train at once
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, output_path)
  return output_path


class Tokenizer:
  """A loaded sentencepiece model with its special ids (pad_id, eos_id, bos_id, unk_id).

  pad_id is the model's pad piece, or unk where it has none (LLaMA's): padding is masked out
  everywhere, so its id only has to differ from EOS.
  """

  def __init__(self, processor: spm.SentencePieceProcessor, path: str):
    self._sp = processor
    self.path = path
    self.unk_id = processor.unk_id()
    self.bos_id = processor.bos_id()
    self.eos_id = processor.eos_id()
    self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else self.unk_id
    if self.bos_id < 0 or self.eos_id < 0:
      raise UserError(f"{path}: the model has no {'BOS' if self.bos_id < 0 else 'EOS'} piece; "
                      f"lmtrain needs both (train one with `lmtrain tokenizer`)")
    if self.pad_id == self.eos_id:
      raise UserError(f"{path}: pad and EOS share id {self.eos_id}; lmtrain needs them different "
                      f"(padding is masked, EOS is where a reward is read)")

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not fileio.isfile(path):
      raise UserError(f"{path}: tokenizer model not found")
    processor = spm.SentencePieceProcessor()
    try:
      if fileio.is_remote(path):  # sentencepiece opens local files only
        processor.LoadFromSerializedProto(fileio.read_bytes(path))
      else:
        processor.Load(path)
    except (OSError, RuntimeError) as e:
      raise UserError(f"{path}: not a sentencepiece model ({e})") from e
    return cls(processor, path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    return self._sp.encode(text)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def decode(self, ids) -> str:
    """Text of `ids`; padding (pad_id) is dropped, EOS does not stop decoding."""
    return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])


def seqio_vocabulary(path: str):
  """The model at `path` as a `seqio.SentencePieceVocabulary` (imports seqio only when called)."""
  import seqio  # pylint: disable=g-import-not-at-top
  if not fileio.isfile(path):  # seqio reads through tf.io.gfile, which takes gs:// too
    raise UserError(f"{path}: tokenizer model not found")
  return seqio.SentencePieceVocabulary(path)
