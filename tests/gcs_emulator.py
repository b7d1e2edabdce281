"""A local GCS emulator for the tests (`python tests/gcs_emulator.py start --port N …`, the
options of gcp-storage-emulator), with the response headers real GCS sends with an object's
contents and the emulator omits: tensorstore, Orbax's array store, reads an object's
generation from `x-goog-generation`."""

import sys

from gcp_storage_emulator import __main__ as emulator
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def with_generation(handler):
  def handle(request, response, storage, *args, **kwargs):
    handler(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    except NotFound:
      return
    response['x-goog-generation'] = obj['generation']
    response['x-goog-metageneration'] = obj['metageneration']
  return handle


PATCHED = {objects.get: with_generation(objects.get),
           objects.download: with_generation(objects.download)}
server.HANDLERS = tuple((pattern, {method: PATCHED.get(handler, handler)
                                   for method, handler in methods.items()})
                        for pattern, methods in server.HANDLERS)

if __name__ == '__main__':
  sys.exit(emulator.main())
