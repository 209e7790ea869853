"""The storage layer: the only code that touches filesystems, Parquet and model files."""

from .cache import Cache as Cache, open_cache as open_cache
from .cache_writer import CacheWriter as CacheWriter
from .datasets import (fingerprint as fingerprint, read_dataset as read_dataset, read_ids as read_ids,
                       write_dataset as write_dataset)
from .location import Location as Location, StorageError as StorageError, location as location
from .models import load_model as load_model, save_model as save_model
