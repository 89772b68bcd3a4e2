"""One process of the 2-process test: ``python tests/_dist_worker.py READS.json -- <unmerge stats args>``.

Records every tensor this process reads (checkpoint reads and adapter ΔW), then runs the CLI,
which calls ``jax.distributed.initialize`` from its --coordinator/--num-processes/--process-id.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("UNMERGE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unmerge_jax.cli.main import main  # noqa: E402
from unmerge_jax.io.checkpoint import Checkpoint  # noqa: E402
from unmerge_jax.io.lora import Adapter  # noqa: E402

reads = []
_read, _delta = Checkpoint.read_raw, Adapter.delta  # Checkpoint.read goes through read_raw


def read_raw(self, name, *args, **kw):
    reads.append([Path(self.path).name, name])
    return _read(self, name, *args, **kw)


def delta(self, name, *args, **kw):
    reads.append([Path(self.path).name, name])
    return _delta(self, name, *args, **kw)


_flat = Checkpoint.read_raw_flat


_last_stop = {}


def read_raw_flat(self, name, start, stop, *args, **kw):
    # A pass reads a tensor in increasing, disjoint row ranges: a range that does not continue
    # past the previous one of the same tensor starts a new read of it.
    key = (id(self), name)
    if int(start) < _last_stop.get(key, int(start) + 1):
        reads.append([Path(self.path).name, name])
    _last_stop[key] = int(stop)
    return _flat(self, name, start, stop, *args, **kw)


Checkpoint.read_raw, Checkpoint.read_raw_flat, Adapter.delta = read_raw, read_raw_flat, delta

if __name__ == "__main__":
    out, sep, *args = sys.argv[1:]
    assert sep == "--"
    rc = main(args)
    import jax

    Path(out).write_text(json.dumps({"rc": rc, "reads": reads, "process": jax.process_index(),
                                     "local_devices": len(jax.local_devices()), "devices": len(jax.devices())}))
    sys.exit(rc)
