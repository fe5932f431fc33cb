#!/usr/bin/env python3
"""Module-level import cycles from `cargo modules dependencies` dot output.

Each node is mapped to the module that contains it; a "uses" edge from A to B becomes an edge
between their modules, except where one module contains the other (a module and its own
submodules may refer to each other). Prints every strongly connected component of more than
one module, and exits 1 if there is one."""
import re, sys
from collections import defaultdict
text = sys.stdin.read()
kind = {}
for m in re.finditer(r'^\s*"([^"]+)" \[label="([^|"]*)\|', text, re.M):
    kind[m.group(1)] = m.group(2)
def module_of(n):
    while n in kind and not (kind[n].endswith('mod') or kind[n] == 'crate'):
        n = n.rsplit('::', 1)[0]
    return n
edges = defaultdict(set)
for m in re.finditer(r'^\s*"([^"]+)" -> "([^"]+)" \[label="uses"', text, re.M):
    a, b = module_of(m.group(1)), module_of(m.group(2))
    if a == b or a.startswith(b + '::') or b.startswith(a + '::'):
        continue
    edges[a].add(b)
nodes = set(edges) | {b for s in edges.values() for b in s}
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in sorted(nodes):
    if v not in index: visit(v)
print(f"{len(nodes)} modules, {sum(len(s) for s in edges.values())} module-level use edges")
for c in sccs:
    print("cycle:", " <-> ".join(c))
    for a in c:
        for b in sorted(edges[a] & set(c)):
            print(f"   {a} -> {b}")
sys.exit(1 if sccs else 0)
