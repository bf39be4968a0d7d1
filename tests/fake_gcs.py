"""A fake Google Cloud Storage server on 127.0.0.1 for tests: gcp-storage-emulator, in memory.

The emulator's object downloads lack the x-goog-generation header that tensorstore (orbax's array
store) reads to track an OCDBT manifest's version, so `start` adds it. Like the emulator, the server
ignores write preconditions: enough for one writer, which is all a test run has.
"""

import socket

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the emulator's handler answers 404 itself
    obj = None
  if obj:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  return _download(request, response, storage, *args, **kwargs)


def start(bucket: str):
  """(server, URL) of a fresh in-memory server holding the empty `bucket`; stop with .stop()."""
  objects.download = _download_with_generation
  # Imported after the patch, as its route table binds the handler functions when imported.
  from gcp_storage_emulator import server as server_lib  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  return server, f"http://127.0.0.1:{port}"
