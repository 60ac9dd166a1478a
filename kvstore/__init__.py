"""The kvstore: the only package that talks to etcd.

`SyncStore` writes one prefix, `WatchStore` mirrors one prefix, both over a `Backend` that the caller connects
(`kvstore.etcd.connect`) and hands in. Errors are in `kvstore.errors`; the test kit is `kvstore.testing`.
"""

from kvstore import errors
from kvstore.backend import Backend, Delete, DeleteOp, Entry, Event, Listing, PutOp, Upsert, WriteOp
from kvstore.config import EtcdConfig, load_config_file
from kvstore.leases import LeaseManager
from kvstore.syncing import SyncStore
from kvstore.watching import Observer, WatchStore

__all__ = [
    "Backend",
    "Delete",
    "DeleteOp",
    "Entry",
    "EtcdConfig",
    "Event",
    "LeaseManager",
    "Listing",
    "Observer",
    "PutOp",
    "SyncStore",
    "Upsert",
    "WatchStore",
    "WriteOp",
    "errors",
    "load_config_file",
]
