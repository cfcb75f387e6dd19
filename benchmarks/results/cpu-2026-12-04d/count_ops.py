"""Counts the torch operators of V2's tree recording and greedy acceptance (torch versions) for
4 requests with 64-node trees: a CPU stand-in for the GPU launches the host issues per step.

    python benchmarks/results/cpu-2026-12-04d/count_ops.py
"""
import torch
from collections import Counter
from torch.utils._python_dispatch import TorchDispatchMode
from vllm_longspec.engine.v2_tree import TreeSlots
from vllm_longspec.engine.tree_device import accept_greedy_device
from vllm_longspec.engine.beam_tree import tree_node_offsets

VIEW = {"view", "unsqueeze", "expand", "slice", "select", "squeeze", "permute", "reshape", "alias", "t", "transpose", "_unsafe_view", "detach", "lift_fresh", "as_strided"}
class Count(TorchDispatchMode):
    def __init__(self): super().__init__(); self.ops = Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))
def report(label, c):
    real = {k: v for k, v in c.ops.items() if k not in VIEW}
    print(label, "ops", sum(c.ops.values()), "non-view", sum(real.values()), dict(sorted(real.items(), key=lambda x: -x[1])))

widths = (4, 16, 16, 16, 11)
B = 4
slots_obj = TreeSlots(8, widths, torch.device("cpu"))
n = slots_obj.num_nodes
offs = tree_node_offsets(widths)
parents = torch.full((B, n), -1, dtype=torch.long)
for lvl, w in enumerate(widths):
    first_prev = 0 if lvl == 0 else offs[lvl - 1]
    prev_w = 1 if lvl == 0 else widths[lvl - 1]
    for i in range(w):
        parents[:, offs[lvl] + i] = first_prev + (i % prev_w)
tokens = torch.randint(0, 1000, (B, n - 1))
slots = torch.arange(B)
ok = torch.ones(B, dtype=torch.bool)
c = Count()
with c:
    slots_obj.record(slots, tokens, parents, ok)
report("record", c)
node_tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), tokens], 1)
valid = torch.ones(B, n, dtype=torch.bool)
logits_rows = torch.arange(B * n).view(B, n)
argmax = torch.randint(0, 1000, (B * n,))
c = Count()
with c:
    rows = slots_obj.rows(slots, node_tokens, valid, logits_rows)
    accept_greedy_device(rows, argmax)
report("rows+accept_greedy", c)
