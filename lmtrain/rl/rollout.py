"""Rollouts: sample a response to each prompt, and read models on the prompt + response sequences.

A batch is a left-padded prompt [B, P] followed directly by its response [B, N]; `mask` [B, N] is 1
on the response's tokens up to and including its EOS.

The rollout decodes with the policy laid out for inference (`decode_layout`): once per rollout
its weights are cast to ROLLOUT_DTYPE and gathered along the batch axes (tensor parallelism kept),
so the decode loop reads local weights and gathers none per generated token. A LoRA policy's
adapters are folded into its weights first (lora.merged): one matmul per weight per token, as
without adapters.
"""

import contextlib

import jax
import jax.numpy as jnp

from lmtrain import parallel
from lmtrain.model import generate as generate_lib
from lmtrain.model import lora, transformer
from lmtrain.rl import core
from lmtrain.rl.config import RLConfig
from lmtrain.train import memory as memory_lib


def sequences(prompt, prompt_length, response, response_mask):
  """Token rows [B, P+N] with their positions and segment ids (1 on real tokens, 0 on padding).

  The prompt's real tokens take positions 0..len-1 and the response continues from len, as during
  generation, so the padding changes nothing."""
  width = prompt.shape[1]
  total = width + response.shape[1]
  index = jnp.arange(total, dtype=jnp.int32)[None, :]
  start = (width - prompt_length.astype(jnp.int32))[:, None]
  in_prompt = (index >= start) & (index < width)
  in_response = jnp.concatenate(
      [jnp.zeros_like(prompt, dtype=bool), response_mask > 0], axis=1)
  tokens = jnp.concatenate([prompt, response], axis=1).astype(jnp.int32)
  segment_ids = (in_prompt | in_response).astype(jnp.int32)
  positions = jnp.maximum(index - start, 0)
  return tokens, positions, segment_ids


def prompt_sharing(rows: int, group: int) -> int:
  """How many consecutive rows of a batch of `rows` share one computation of their prompt
  (Transformer.hidden_shared, and the rollout's prefill), when every `group` consecutive rows
  hold the same prompt (GRPO's samples of one prompt): the largest divisor s of `group` that
  divides `rows` and leaves rows / s prompts that split over the active mesh's batch shards like
  the rows, so that no device computes a prompt that it does not hold. 1: no sharing."""
  active = parallel.active()
  shards = parallel.batch_shard_count(active[0]) if active is not None else 1
  return max([1] + [s for s in range(2, group + 1)
                    if group % s == 0 and rows % s == 0 and (rows // s) % shards == 0])


def _split_hidden(model, tokens, positions, segment_ids, width: int, share: int):
  """(final hidden states of the first `width` columns, shared by each `share` consecutive rows
  [B / share, width, D]; of the other columns [B, L - width, D]) of token rows [B, L]."""
  first = lambda x: transformer.first_of_groups(x[:, :width], share)
  return model.hidden_shared(first(tokens), first(positions), first(segment_ids),
                             tokens[:, width:], positions[:, width:], segment_ids[:, width:],
                             share)


def response_hidden(model, prompt, prompt_length, response, response_mask, share: int = 1):
  """Hidden states [B, N, D] that predict each response token (and the value before it).
  `share` > 1: each `share` consecutive rows hold the same prompt (prompt_sharing), computed once
  for them."""
  tokens, positions, segment_ids = sequences(prompt, prompt_length, response, response_mask)
  width = prompt.shape[1]
  if share == 1 or response.shape[1] == 1:
    hidden = model.hidden(tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1])
    return hidden[:, width - 1:]
  prompt_hidden, hidden = _split_hidden(model, tokens[:, :-1], positions[:, :-1],
                                        segment_ids[:, :-1], width, share)
  return transformer.after_shared(prompt_hidden[:, -1:], hidden, share)


def response_logprobs(model, prompt, prompt_length, response, mask, temperature,
                      with_entropy=False, share: int = 1):
  """([B, N] log-probs of the response tokens, [B, N] entropies or None): core.token_logprobs."""
  hidden = response_hidden(model, prompt, prompt_length, response, mask, share)
  return core.token_logprobs(model, hidden, response, mask, temperature, with_entropy)


def response_values(model, prompt, prompt_length, response, mask):
  """[B, N] value of the state before each response token; 0 on padding."""
  values = model.scores(response_hidden(model, prompt, prompt_length, response, mask))
  return jnp.where(mask > 0, values, 0.0)


def sequence_reward(model, prompt, prompt_length, response, mask, offset=0.0, scale=1.0,
                    share: int = 1):
  """[B] reward-model score at each sequence's last real token (its EOS), normalised. `share`:
  as response_hidden's."""
  tokens, positions, segment_ids = sequences(prompt, prompt_length, response, mask)
  response_mask = jnp.concatenate([jnp.zeros_like(prompt, dtype=mask.dtype), mask], axis=1)
  hidden = None
  if share > 1:
    prompt_hidden, rest = _split_hidden(model, tokens, positions, segment_ids, prompt.shape[1],
                                        share)
    hidden = transformer.after_shared(prompt_hidden, rest, share)
  scores = core.reward_scores(model, tokens, positions, segment_ids, response_mask,
                              hidden=hidden)
  return (scores - offset) / scale


def decode_layout(graphdef, params, dtype: str):
  """(the graphdef and params of the policy for decoding, a context that traces the decode loop
  with the matching rules): adapters folded into their weights (lora.merged, in float32, then
  the graphdef of the base model), weight matrices in `dtype` (a ROLLOUT_DTYPE setting;
  transformer.cast_matrices) and, under an active mesh, laid out by parallel.decode_rules: one
  gather of the weights per rollout instead of one per generated token. Costs a copy of the
  weights that is whole along the batch axes (counted in the RL stage's memory plan)."""
  model = transformer.merge(graphdef, params)
  cfg = model.cfg
  if lora.has_adapters(params):
    params = lora.merged(params, cfg.lora_scale)
    graphdef, _, names = transformer.abstract_model(lora.base_config(cfg))
  else:
    _, _, names = transformer.split_params(model)
  params = transformer.cast_matrices(params, names, transformer.resolve_dtype(dtype, cfg))
  active = parallel.active()
  if active is None:
    return graphdef, params, contextlib.nullcontext()
  mesh, rules = active
  rules = parallel.decode_rules(rules)
  params = jax.lax.with_sharding_constraint(
      params, parallel.tree_shardings(mesh, params, names, rules))
  return graphdef, params, parallel.activate(mesh, rules)


def rollout_memory(policy_config, rollout_dtype: str, mesh, rollouts: int, length: int) -> dict:
  """Per-device bytes a rollout adds to the train state: the decode copy of the policy
  (decode_layout: whole along the batch axes, in ROLLOUT_DTYPE) and the KV cache of `rollouts`
  rows of `length` tokens. For the RL stage's memory plan and `lmtrain plan`. A LoRA policy
  decodes with merged weights: the base model's shapes."""
  _, abstract, names = transformer.abstract_model(lora.base_config(policy_config))
  dtype = transformer.resolve_dtype(rollout_dtype, policy_config)
  decode = jax.eval_shape(lambda tree: transformer.cast_matrices(tree, names, dtype), abstract)
  rules = parallel.decode_rules(parallel.axis_rules())
  return {"decode weights": memory_lib.tree_bytes(
              decode, parallel.tree_shardings(mesh, decode, names, rules)),
          "KV cache": memory_lib.kv_cache_bytes(policy_config, rollouts, length, mesh)}


def rollout(policy_graphdef, reward_graphdef, cfg: RLConfig, policy_params, reward_params,
            prompt, prompt_length, rng, *, eos_id: int, pad_id: int, greedy: bool = False,
            group: int = 1):
  """Samples a response to each prompt and scores it with the reward model (when there is one).
  `group`: each `group` consecutive rows hold the same prompt (GRPO's samples of it), whose
  prefill and reward-model pass then run once for as many of them as the mesh allows
  (prompt_sharing).

  Returns {response [B, N], mask [B, N] float (1 up to and including EOS), done [B], rm_score [B]
  (normalised; only with a reward model)}. The policy decodes in `cfg.rollout_dtype`
  (decode_layout)."""
  share = prompt_sharing(prompt.shape[0], group)
  graphdef, params, decoding = decode_layout(policy_graphdef, policy_params, cfg.rollout_dtype)
  with decoding:
    out = generate_lib.sample_sequences(
        graphdef, params, prompt, prompt_length, rng,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, greedy=greedy, eos_id=eos_id, pad_id=pad_id, left_padded=True,
        share=share)
  response = parallel.constrain(out.tokens, ("batch", None))
  mask = parallel.constrain(out.mask.astype(jnp.float32), ("batch", None))
  result = {"response": response, "mask": mask, "done": out.done}
  if reward_graphdef is not None:
    result["rm_score"] = sequence_reward(transformer.merge(reward_graphdef, reward_params),
                                         prompt, prompt_length, response, mask,
                                         cfg.reward_offset, cfg.reward_scale, share)
  return result
