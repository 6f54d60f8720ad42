"""The limits of crash-isolated decoding in one frozen record; the defaults are the limits used in runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IsolationPolicy:
    """How long `decode_all` waits, how far it looks back after a death, and when it gives up."""

    # Batches each loader process decodes ahead of the consumer.
    prefetch: int = 4
    # This many crashes in a row is the machine's decoder, not the files: stop rather than skip them all.
    max_crashes_in_a_row: int = 32
    # A file whose process is killed this many times by something other than a crash stops the run.
    max_unexplained_deaths: int = 2
    # No batch from the loader for this long, per file in a batch (at least stall_min_s): a decoder is
    # stuck in a loop, and isolation finds the file. A batch is one process's work, file after file.
    stall_per_file_s: float = 5.0
    stall_min_s: float = 120.0
    # DataLoader checks for dead processes only between timed waits for a batch: wait in short ones.
    poll_s: float = 5.0
    # No result for one file for this long, twice, in isolation: that file hangs the decoder and is skipped.
    file_timeout_s: float = 60.0

    def stall_s(self, batch_size: int) -> float:
        """Seconds without a batch after which the loader counts as stalled."""
        return max(self.stall_min_s, self.stall_per_file_s * batch_size)

    def window(self, batch_size: int, workers: int) -> int:
        """Files a loader may have asked its processes for: its prefetch, plus one batch."""
        return batch_size * (self.prefetch * workers + 1)
