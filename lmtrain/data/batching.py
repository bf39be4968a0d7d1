"""What every token dataset shares: documents as [BOS] ids [EOS], chunks of at most seq_len
targets, and packed or padded rows batched per host.

Row features: inputs, targets, segment_ids (1, 2, ... per segment, 0 = padding), positions
(restarting at 0 per segment) as int32, and loss_mask (1.0 on the targets that count) as float32.
"""

import grain
import numpy as np

from lmtrain.data.tokenizer import PAD_ID
from lmtrain.errors import UserError


def document_ids(tokenizer, text: str) -> np.ndarray:
  """[BOS] + encode(text) + [EOS] as int32."""
  return np.asarray([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], np.int32)


def chunk_ids(ids: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Splits ids into chunks of <= seq_len + 1 tokens overlapping by one, as inputs/targets.

  The overlap makes every token after the first a target exactly once.
  """
  chunks = (ids[start:start + seq_len + 1] for start in range(0, len(ids) - 1, seq_len))
  return [{"inputs": chunk[:-1], "targets": chunk[1:]} for chunk in chunks]


def _loss_mask(element, real: np.ndarray) -> np.ndarray:
  """The chunk's own loss weights when it has them (SFT), else 1.0 on every real target."""
  return element["loss_mask"] if "loss_mask" in element else real


def _from_packed(row):
  segment_ids = row["inputs_segment_ids"]
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "segment_ids": segment_ids.astype(np.int32),
      "positions": row["inputs_positions"].astype(np.int32),
      "loss_mask": _loss_mask(row, segment_ids > 0).astype(np.float32),
  }


class _Pad(grain.transforms.Map):
  """One chunk per row, right-padded with PAD_ID."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def map(self, element):
    n = len(element["inputs"])
    pad = self._seq_len - n
    real = np.ones(n, np.int32)
    return {
        "inputs": np.pad(element["inputs"], (0, pad), constant_values=PAD_ID),
        "targets": np.pad(element["targets"], (0, pad), constant_values=PAD_ID),
        "segment_ids": np.pad(real, (0, pad)),
        "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
        "loss_mask": np.pad(_loss_mask(element, real).astype(np.float32), (0, pad)),
    }


def host_rows(*, seq_len: int, batch_size: int, process_index: int, process_count: int) -> int:
  """Rows per host batch, after checking the shape arguments."""
  if seq_len < 1:
    raise UserError(f"seq_len must be positive, got {seq_len}")
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch_size {batch_size} is not a positive multiple of the "
                    f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return batch_size // process_count


def batch_chunks(ds: grain.IterDataset, *, seq_len: int, rows: int, seed: int, shuffle: bool,
                 pack: bool, features: tuple[str, ...] = ("inputs", "targets")
                 ) -> grain.IterDataset:
  """Chunks of <= seq_len tokens -> packed or padded rows -> batches of `rows`, prefetched.

  `features` are the per-token arrays of a chunk; a "loss_mask" among them is kept (0 on
  padding), otherwise the mask is 1.0 on every real target.
  """
  if pack:
    # First-fit packing pads rather than splits, so a chunk is never cut across rows. Its fill
    # value 0 is PAD_ID (and loss weight 0).
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={name: seq_len for name in features},
        num_packing_bins=max(rows, 8), seed=seed, shuffle_bins=shuffle)
    ds = ds.map(_from_packed)
  else:
    ds = ds.map(_Pad(seq_len))
  ds = ds.batch(rows, drop_remainder=True)
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
