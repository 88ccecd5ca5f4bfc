"""Processes: their environment (NVLink multicast off, GPU pinning, child environments) and
torch.distributed groups for tensor parallelism. Imported only when more than one process works
on a job; the library's single-process path never loads it."""
