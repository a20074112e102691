"""SAM2's image encoder beside generation: it needs only the image, and its output only at the mask pass.

``BackgroundEncoder.submit(stages, pixels)`` starts the encoder on one worker thread (on a GPU, on
a CUDA stream of its own, ordered after the pixels' upload and before the consumer's use) and
returns a ``Future``; the pipeline goes on to the vision tower and generation and waits for the
embedding only when the answer holds a box. With no box the result is never awaited: the next
command on the same image uses it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class BackgroundEncoder:
    """One worker thread (and on CUDA one stream) running the SAM2 image encoder."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def submit(self, stages, pixels: torch.Tensor) -> Future:
        """Future of (SamImageEmbedding, milliseconds)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens-sam-encoder")
        ready = None
        if pixels.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(pixels.device))  # the upload of pixels, on the caller's stream
        return self._pool.submit(self._encode, stages, pixels, ready)

    def _encode(self, stages, pixels: torch.Tensor, ready):
        start = time.perf_counter()
        with torch.inference_mode():
            if ready is None:
                embedding = stages.encode_sam_image(pixels)
                done = None
            else:
                stream = self._streams.setdefault(pixels.device, torch.cuda.Stream(pixels.device))
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    embedding = stages.encode_sam_image(pixels)
                    done = torch.cuda.Event()
                    done.record(stream)
                done.synchronize()  # the timing below is the encoder's, and the consumer's wait is then free
        end = time.perf_counter()
        if done is not None:  # the tensors were made on our stream and are used on the consumer's
            consumer = torch.cuda.current_stream(pixels.device)
            for tensor in (embedding.image_embed, *embedding.high_res_feats):
                tensor.record_stream(consumer)
        return embedding, (end - start) * 1000

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
