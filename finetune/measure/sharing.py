"""Evaluation work shared by the ranks of a launch: each rank takes a share of the items (lm-eval's requests, whole
documents at a time; drift texts), and every rank gets back every item's result in the order one process would
have them, so the numbers built from them are the same as one process's, example by example.

lm-eval has its own data-parallel mode (documents split by `lm.rank`, samples gathered on rank 0), but it draws
each task's few-shot examples from one random stream per rank, in that rank's document order (its own "TODO: need to
offset doc_id by rank" in Task.build_all_requests): with 2 ranks, 7 of 8 documents of a 2-shot task got other
few-shot examples than in one process. Sharing its requests instead leaves every prompt as one process builds it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """The processes that share an evaluation (one by default). Every method is collective when there are several:
    all ranks call it, in the same order."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, accelerator) -> Ranks:
        return cls(accelerator.process_index, accelerator.num_processes)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_main(self, value):
        """The main process's `value`, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def map(self, items: Sequence, work: Callable[[list], list], *, key: Callable[[object], Hashable] | None = None,
            what: str = "items") -> list:
        """work(this rank's items) -> their results, in order; returns the results of all `items`, in order, on every
        rank. Items with the same `key` go to the same rank (a document's requests, which lm-eval scores in one
        forward pass when they share a context); keys are dealt out in order of first appearance, round robin."""
        keys: dict = {}
        owners = [keys.setdefault(key(item) if key else i, len(keys)) % self.world for i, item in enumerate(items)]
        mine = [i for i, owner in enumerate(owners) if owner == self.rank]
        results = list(work([items[i] for i in mine])) if mine else []
        if self.world > 1:
            groups = f" ({len(range(self.rank, len(keys), self.world))} of {len(keys)} documents)" if key else ""
            log.debug("rank %d of %d: %d of %d %s%s", self.rank, self.world, len(mine), len(items), what, groups)
        out = [None] * len(items)
        for indices, values in self.gather((mine, results)):
            for i, value in zip(indices, values, strict=True):
                out[i] = value
        return out


@functools.cache
def shared_lm_class():
    """lm-eval's HF model with its requests shared by `ranks`, each rank scoring its share with a whole model of its
    own; lm-eval itself sees one process. Only the main process shows lm-eval's progress bars."""
    from lm_eval.models.huggingface import HFLM

    from . import prefix_sharing

    def document(request) -> tuple:
        return request.task_name, request.doc_id

    class SharedHFLM(HFLM):
        def __init__(self, *args, ranks: Ranks, share_prefixes: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.ranks, self.share_prefixes = ranks, share_prefixes

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            shared = prefix_sharing.loglikelihoods(self, requests) if self.share_prefixes else None
            return shared if shared is not None else super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

        def _model_generate(self, context, max_length: int, stop: list[str], **kwargs):
            if not self.share_prefixes or kwargs.get("attention_mask") is None or self.backend != "causal":
                return super()._model_generate(context, max_length, stop, **kwargs)
            mask = kwargs.pop("attention_mask")
            return prefix_sharing.generate_with_shared_prefix(
                self, lambda **kw: super(SharedHFLM, self)._model_generate(max_length=max_length, stop=stop, **kw),
                context, mask, **kwargs)

        def _shared(self, method: str, requests, disable_tqdm: bool):
            score = getattr(super(), method)
            return self.ranks.map(requests, lambda mine: score(mine, disable_tqdm or not self.ranks.main),
                                  key=document, what=f"{method} requests")

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._shared("loglikelihood", requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._shared("loglikelihood_rolling", requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._shared("generate_until", requests, disable_tqdm)

    return SharedHFLM


@contextmanager
def as_one_process() -> Iterator[None]:
    """lm-eval returns results only where LOCAL_RANK is 0 (simple_evaluate, for tensor-parallel launches where every
    rank has lm.rank 0). With its requests shared by SharedHFLM, every rank is one process to lm-eval and gets every
    result."""
    local_rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if local_rank is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = local_rank
