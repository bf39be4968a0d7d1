"""Device mesh, logical->mesh axis rules and sharding helpers; multi-host initialisation.

Layers only name their axes (`embed`, `heads`, ...). The rules here, plain data set from gin, decide which
mesh axis each name lands on. Constraints are no-ops when no mesh is active, so model code runs unchanged
in a unit test on one device.
"""

import contextlib
import math
import os
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). Parameters and activations use distinct
# names where they must land on different mesh axes (an activation's `act_embed` is not FSDP-sharded,
# its batch is).
DEFAULT_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@gin.configurable
def axis_rules(rules=DEFAULT_RULES):
  """The logical->mesh rules in force; override in gin with `axis_rules.rules = (...)`."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _resolve_shape(shape: dict, n_devices: int, what: str) -> tuple[int, ...]:
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise UserError(f"{what}: unknown mesh axes {sorted(unknown)}; the axes are {list(MESH_AXES)}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError(f"{what}: at most one axis may be -1 (the rest of the devices), got {shape}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or n_devices % known:
      raise UserError(f"{what}={shape} does not fit {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // known
  if any(s < 1 for s in sizes) or math.prod(sizes) != n_devices:
    raise UserError(
        f"{what}={shape} needs {math.prod(sizes)} devices but {n_devices} are available "
        f"({jax.devices()[0].platform})")
  return tuple(sizes)


@gin.configurable
def make_mesh(shape=gin.REQUIRED, dcn_shape=None, devices=None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh. `shape` is the per-slice (ICI) shape; `dcn_shape` the
  across-slice shape for multi-slice jobs. -1 in `shape` means the rest of the devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape)
  if dcn_shape:
    n_slices = math.prod(int(v) for v in dict(dcn_shape).values())
    if len(devices) % n_slices:
      raise UserError(f"MESH_DCN_SHAPE={dcn_shape} does not divide {len(devices)} devices")
    ici = _resolve_shape(shape, len(devices) // n_slices, "MESH_SHAPE")
    dcn = _resolve_shape(dict(dcn_shape), n_slices, "MESH_DCN_SHAPE")
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    sizes = _resolve_shape(shape, len(devices), "MESH_SHAPE")
    try:
      array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      # Topology-aware placement is not available for every shape/platform (CPU, odd shapes).
      array = np.asarray(devices).reshape(sizes)
  return Mesh(array, MESH_AXES)


def abstract_mesh(shape: dict, n_devices: int):
  """A mesh of the given shape without real devices, to check configs for slices we do not have."""
  sizes = _resolve_shape(dict(shape), n_devices, "MESH_SHAPE")
  return jax.sharding.AbstractMesh(sizes, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules, mesh, shape: Sequence[int] | None = None
                    ) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec. A mesh axis is used at most once per array; a
  dimension that the mesh axes do not divide stays replicated rather than failing."""
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = rule_map.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.axis_names and a not in used and mesh.shape[a] > 1)
    if shape is not None and axes:
      # Keep the longest prefix of axes that divides this dimension.
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def named_sharding(mesh, names, rules, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def is_axis_names(x) -> bool:
  """Whether x is one leaf of a logical-names tree: a tuple of axis names (or None)."""
  return isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x)


def tree_shardings(mesh, abstract_tree, names_tree, rules):
  """NamedShardings for a pytree of arrays given a matching pytree of logical-name tuples."""
  return jax.tree.map(lambda a, n: named_sharding(mesh, n, rules, a.shape), abstract_tree,
                      names_tree, is_leaf=is_axis_names)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shard_count(mesh) -> int:
  """How many ways a global batch is split: the data x fsdp axes that `batch` maps to."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs of `abstract_tree` that carry `shardings` (for jit's lower and orbax's
  restore)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


# The mesh and rules in force while tracing a step; `constrain` reads them.
_ACTIVE: list[tuple[Mesh, tuple]] = []


@contextlib.contextmanager
def activate(mesh, rules):
  """Makes `constrain` place activations on `mesh` by `rules` (at trace time)."""
  _ACTIVE.append((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.pop()


def active():
  """(mesh, rules) in force while tracing, or None."""
  return _ACTIVE[-1] if _ACTIVE else None


def constrain(x, names):
  """Sharding constraint on an activation by logical names; a no-op when no mesh is active."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, rules, x.shape))


def lookup(table, ids, table_names):
  """table[ids] for a [rows, width] table laid out by `table_names`, without gathering the table.

  Every device already holds all rows of its slice of the width (FSDP shards that axis), so the
  ids of the batch shards that differ only along the table's mesh axes are gathered (small
  integers) and each device looks up its slice of the width; the rows then move to the
  batch-sharded activation layout (an all-to-all). Gathering the table instead would put
  rows x width floats on every device. A no-op layout-wise when no mesh is active."""
  if not _ACTIVE:
    return jnp.take(table, ids, axis=0)
  mesh, rules = _ACTIVE[-1]
  table_spec = logical_to_spec(table_names, rules, mesh, table.shape)
  table_axes = {a for entry in table_spec if entry for a in
                ((entry,) if isinstance(entry, str) else entry)}
  batch_entry = logical_to_spec(("batch",), rules, mesh, ids.shape[:1])[0]
  batch_axes = () if batch_entry is None else (
      (batch_entry,) if isinstance(batch_entry, str) else tuple(batch_entry))
  kept = tuple(a for a in batch_axes if a not in table_axes) or None
  ids = jax.lax.with_sharding_constraint(ids, NamedSharding(mesh, PartitionSpec(kept)))
  rows = jnp.take(table, ids, axis=0)
  width = table_spec[1] if len(table_spec) > 1 else None
  spec = PartitionSpec(kept, *([None] * (ids.ndim - 1)), width)
  return jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, spec))


def decode_rules(rules):
  """`rules` for weights read at every decode step: the mesh axes that split the batch (those of
  `batch`: data, fsdp) taken out of every other name's rule, tensor parallelism kept.

  Under the training rules an FSDP-sharded weight is all-gathered where it is used, i.e. once per
  layer per generated token inside a decode loop; laid out by these rules before the loop, each
  device holds whole weights along the batch axes (its tensor slice of them) and the loop gathers
  none. Activations keep their layout: `batch` itself is unchanged."""
  rule_map = dict(rules)
  batch = rule_map.get("batch")
  batch_axes = set() if batch is None else {batch} if isinstance(batch, str) else set(batch)
  out = []
  for name, axes in rules:
    if name != "batch" and axes is not None:
      kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a not in batch_axes)
      axes = None if not kept else kept[0] if len(kept) == 1 else kept
    out.append((name, axes))
  return tuple(out)


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
  return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), rules)


def global_batch(local_batch: dict, mesh, rules) -> dict:
  """Assembles per-host numpy batches into global arrays sharded over the batch axes."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
      for k, v in local_batch.items()
  }


def from_host(x, sharding):
  """A global array from a numpy array that every host holds whole (e.g. eval prompts): each host
  places its own shards. jit refuses plain numpy inputs with a non-trivial sharding across hosts."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x) -> np.ndarray:
  """The whole of a (possibly multi-host) global array, as numpy, on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Starts JAX's multi-controller runtime: explicitly from flags/env (several processes on one
  machine behave like the hosts of a pod), or automatically on a Cloud TPU VM with several hosts.

  A process that dies is noticed by the others through the coordination service's heartbeat
  (LMTRAIN_HEARTBEAT_TIMEOUT seconds, default 100): they then exit non-zero instead of hanging.
  """
  coordinator_address = coordinator_address or os.environ.get("LMTRAIN_COORDINATOR_ADDRESS")
  num_processes = num_processes or os.environ.get("LMTRAIN_NUM_PROCESSES")
  process_id = process_id if process_id is not None else os.environ.get("LMTRAIN_PROCESS_ID")
  heartbeat = int(os.environ.get("LMTRAIN_HEARTBEAT_TIMEOUT", "100"))
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise UserError("--coordinator_address needs --num_processes and --process_id")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
      # Cross-process collectives on CPU (tests, CPU clusters) go through gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id),
                               heartbeat_timeout_seconds=heartbeat)
  elif os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or tpu_host_count() > 1:
    # JAX finds the coordinator and this host's id from the TPU runtime itself.
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)


TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")  # v2-v4 and v5e/v5p/v6e TPU VMs
_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def _tpu_metadata(attribute: str) -> str | None:
  """A Cloud TPU VM's metadata attribute, or None when there is no metadata server to ask."""
  import urllib.request  # pylint: disable=g-import-not-at-top
  request = urllib.request.Request(_METADATA_URL + attribute, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=2) as response:
      return response.read().decode()
  except OSError:
    return None


def tpu_host_count() -> int:
  """Hosts of this Cloud TPU slice as its runtime reports them: TPU_WORKER_HOSTNAMES when set,
  else the VM's `worker-network-endpoints` metadata (which a plain TPU VM shell has without any
  environment variable); 1 off TPU, where no metadata server is asked."""
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if hostnames.strip():
    return len([h for h in hostnames.split(",") if h.strip()])
  if not any(os.path.exists(path) for path in TPU_DEVICE_FILES):
    return 1
  endpoints = _tpu_metadata("worker-network-endpoints")
  if not endpoints:
    return 1
  return max(1, len([e for e in endpoints.split(",") if e.strip()]))
