"""TF bundle output written by several processes (one Ray task each).

Each task writes the keys it is given (the tensors it computed, the untouched ones it
copies) as bundle parts in the driver's temp directory (``BundlePartWriter``: parts named
``task-<k>-part-<j>``, flushed at ``PART_BYTES`` like the local writer's, so a task's
memory stays bounded). The driver merges every part with TensorFlow's
``MergeV2Checkpoints`` (each part's data file renamed to ``data-0000i-of-0000n``, one
``.index`` written from the parts' entries: dtype, shape, shard id, offset, size,
crc32c) and publishes as the local writer does (``BundleWriter.finalize_parts``).
"""
from __future__ import annotations

from pathlib import Path

from .tf_bundle_writer import BundleWriter


def part_stem(index) -> str:
    return f"task-{int(index):05d}-part"


class BundlePartWriter(BundleWriter):
    """Writes some keys of ``like``'s output as parts in ``folder`` (the driver's temp
    directory) for task ``index``; ``close()`` returns the part prefixes written.

    A retried task starts afresh: the parts an earlier attempt left are removed first."""

    def __init__(self, like, folder, index):
        self.like, self.kind = like, like.kind
        self.target = self._tmp = str(folder)
        self.part_stem = part_stem(index)
        self._parts, self._pending, self._pending_bytes = [], {}, 0
        self._written, self._done = set(), False
        for old in Path(folder).glob(f"{self.part_stem}-*"):
            old.unlink()

    def copy_key(self, key) -> None:
        """Copy storage key ``key`` of the input (read and written again, as locally)."""
        self._put(key, self.like.read_key(key))

    def close(self) -> list:
        self._flush()
        self._done = True
        return list(self._parts)

    def abort(self):
        self._pending = {}
        for old in Path(self._tmp).glob(f"{self.part_stem}-*"):
            old.unlink(missing_ok=True)

    def finalize(self):  # a task never publishes: the driver does
        raise TypeError("BundlePartWriter: call close(); the driver publishes")
