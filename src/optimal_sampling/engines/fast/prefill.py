"""The fast engine's prefill (a mixin of FastEngine, engine.py): prompts in chunks of about
`prefill_tokens` padded tokens, both models at once (the teacher on the prefill side stream), a
small (launch-bound) chunk through a graph of the plan's fixed set, a larger one eagerly at its
exact shape; identical prompts prefilled once and their cache rows copied (engine.py's module
docstring says why prefill has its own streams and graph pool)."""

from __future__ import annotations

import torch

from ..base import SlotRequest
from .attention import prefill_attention
from .cached_model import CachedModel
from .graph_plan import width_of
from .transfer import to_device


class Prefill:
    """FastEngine's prefill methods (they use its models, streams, plan and graph caches)."""

    def prefill_model(self, m: CachedModel, ids, slots, last) -> torch.Tensor:
        """Right-padded prompts ids [n, T] into slots [n]; logits [n, V] at positions last [n]."""
        n, t = ids.shape
        # contiguous once here, not copied by every layer's rope_store
        positions = torch.arange(t, device=ids.device).repeat(n, 1)
        rows = slots[:, None].expand(n, t).contiguous()

        def attend(i, qkv):  # the prompts' own rotated keys and values: no gather from the cache
            return prefill_attention(*m.net.rope_store(i, qkv, positions, rows, m.k[i], m.v[i], keys=True))

        normed = m.net.forward(ids, attend)  # [n, T, hidden]
        return m.net.logits(normed[torch.arange(n, device=ids.device), last])[:, : self.vocab_size]

    def prefill(self, firsts: list[SlotRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill distinct prompts in chunks of about `prefill_tokens` padded tokens; logits [u, V]."""
        order = sorted(
            range(len(firsts)), key=lambda i: -max(len(firsts[i].base_ids), len(firsts[i].teacher_ids))
        )
        out_b: list[torch.Tensor | None] = [None] * len(firsts)
        out_t: list[torch.Tensor | None] = [None] * len(firsts)
        start = 0
        while start < len(order):
            longest = max(len(firsts[order[start]].base_ids), len(firsts[order[start]].teacher_ids))
            take = max(1, self.prefill_tokens // width_of(longest, self.max_len))
            chunk = order[start : start + take]
            logits_b, logits_t = self.prefill_chunk([firsts[i] for i in chunk])
            for row, i in enumerate(chunk):
                out_b[i], out_t[i] = logits_b[row], logits_t[row]
            start += len(chunk)
        return torch.stack(out_b), torch.stack(out_t)

    def prefill_chunk(self, reqs: list[SlotRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts right-padded into one batch; logits [n, V]. A small (launch-bound) chunk replays
        a graph of the plan's fixed set; a larger one is compute-bound, where a graph saves nothing
        and would cost a capture per shape, so it runs eagerly at its exact shape."""
        n = len(reqs)
        longest = max(max(len(r.base_ids), len(r.teacher_ids)) for r in reqs)
        shape = self.plan.prefill_shape(n, longest) if self.prefill_graphs.enabled else None
        if shape is None:
            widths = (max(len(r.base_ids) for r in reqs), max(len(r.teacher_ids) for r in reqs))
            return self.prefill_both(*self.prefill_inputs(reqs, n, *widths))
        key, fn, scratch = self.prefill_graph(*shape)
        inputs = self.prefill_inputs(reqs, shape[0], shape[1], shape[1])
        logits_b, logits_t = self.prefill_graphs.run(key, fn, inputs, scratch)
        return logits_b[:n].clone(), logits_t[:n].clone()

    def prefill_inputs(self, reqs: list[SlotRequest], rows: int, width_b: int, width_t: int) -> list:
        """[ids_b [rows, width_b], ids_t [rows, width_t], meta [3, rows]: slots, last base, last
        teacher] on the device; rows past the requests are padding on the scratch slot."""
        ids_b = torch.zeros(rows, width_b, dtype=torch.long)
        ids_t = torch.zeros(rows, width_t, dtype=torch.long)
        meta = torch.zeros(3, rows, dtype=torch.long)
        meta[0].fill_(self.scratch)
        for row, r in enumerate(reqs):
            ids_b[row, : len(r.base_ids)] = torch.tensor(r.base_ids)
            ids_t[row, : len(r.teacher_ids)] = torch.tensor(r.teacher_ids)
            meta[:, row] = torch.tensor([r.slot, len(r.base_ids) - 1, len(r.teacher_ids) - 1])
        return [to_device(ids_b, self.device), to_device(ids_t, self.device), to_device(meta, self.device)]

    def prefill_both(self, ids_b, ids_t, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' prefill, the teacher on the prefill side stream; graph-capturable."""
        return self.both_models(
            lambda: self.prefill_model(self.base, ids_b, meta[0], meta[1]),
            lambda: self.prefill_model(self.teacher, ids_t, meta[0], meta[2]),
            side=self.prefill_teacher_stream,
        )

    def prefill_graph(self, rows: int, width: int) -> tuple:
        """(key, function, scratch inputs) of the prefill graph of `rows` prompts of `width` tokens."""

        def scratch():
            meta = torch.zeros(3, rows, dtype=torch.long, device=self.device)
            meta[0].fill_(self.scratch)
            ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
            return [ids, ids.clone(), meta]

        return ("prefill", rows, width), self.prefill_both, scratch

    def copy_duplicates(
        self, requests: list[SlotRequest], firsts: list[SlotRequest], owner: list[int]
    ) -> None:
        """Copy the prefilled cache rows of each distinct prompt to its other requests' slots."""
        pairs = [
            (firsts[o].slot, r.slot) for r, o in zip(requests, owner, strict=True) if r.slot != firsts[o].slot
        ]
        if not pairs:
            return
        src = to_device([p[0] for p in pairs], self.device)
        dst = to_device([p[1] for p in pairs], self.device)
        for m, ids in ((self.base, "base_ids"), (self.teacher, "teacher_ids")):
            width = max(len(getattr(firsts[o], ids)) for o in owner)
            m.k[:, dst, :width] = m.k[:, src, :width]
            m.v[:, dst, :width] = m.v[:, src, :width]
