#!/usr/bin/env python3
"""Import cycles among the crate's modules.

Reads every `src/**/*.rs`, resolves each `crate::`, `super::` and `self::` path (in `use`
declarations, groups included, and in code) to the module that holds it, and builds a graph
whose nodes are sibling modules: a reference from anywhere inside `a::x` to anywhere inside
`a::y` is an edge `a::x -> a::y`. A module using its parent's items, or a parent using its
children's, is not an edge (the child is part of the parent). Prints every cycle (strongly
connected set of siblings) and exits 1 if there is one.

    python3 scripts/module-cycles.py            # check
    python3 scripts/module-cycles.py --edges    # also print the sibling graph
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def file_module(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel in (["lib"], ["main"]):
        return ()
    if rel[-1] == "mod":
        rel = rel[:-1]
    return tuple(rel)


def strip(text):
    """Source without comments, string and char literals (kept as blanks, braces balanced)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 40]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'|'\\x..'", text[i:i + 12]):
            m = re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'|'\\x..'", text[i:])
            i += len(m.group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [re.sub(r"as\w+$", "", tree)] if tree else []
    prefix, inner = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    result = []
    for p in parts:
        for sub in expand_use(p):
            result.append(prefix + sub if sub != "self" else prefix.rstrip(":"))
    return result


def main():
    files = {}
    for dirpath, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(dirpath, name)
                files[path] = file_module(path)
    modules = set(files.values())
    refs = []  # (from module, path as a tuple of segments)
    for path, module in files.items():
        text = strip(open(path, encoding="utf-8").read())
        # Inline modules: `mod name {` opens a scope whose `super` is the file's module.
        stack, depth, scopes = [], 0, []
        pos_scope = []
        for m in re.finditer(r"\bmod\s+(\w+)\s*;|\bmod\s+(\w+)\s*\{|\{|\}", text):
            tok = m.group(0)
            if m.group(1):
                modules.add(module + tuple(s for s, _ in stack) + (m.group(1),))
            elif m.group(2):
                depth += 1
                stack.append((m.group(2), depth))
                modules.add(module + tuple(s for s, _ in stack))
                pos_scope.append((m.end(), tuple(s for s, _ in stack)))
            elif tok == "{":
                depth += 1
            else:
                if stack and stack[-1][1] == depth:
                    stack.pop()
                    pos_scope.append((m.end(), tuple(s for s, _ in stack)))
                depth -= 1

        def scope_at(pos):
            cur = ()
            for p, s in pos_scope:
                if p > pos:
                    break
                cur = s
            return module + cur

        seen_spans = []
        for m in re.finditer(r"\buse\s+([^;]+);", text):
            here = scope_at(m.start())
            seen_spans.append((m.start(), m.end()))
            for p in expand_use(m.group(1)):
                refs.append((here, p))
        for m in re.finditer(r"\b(?:crate|super|self)(?:::\w+)+", text):
            if any(a <= m.start() < b for a, b in seen_spans):
                continue
            refs.append((scope_at(m.start()), m.group(0)))

    edges = {}
    for here, p in refs:
        segs = [s for s in p.split("::") if s]
        if not segs:
            continue
        if segs[0] == "crate":
            base, rest = (), segs[1:]
        elif segs[0] in ("super", "self"):
            base = here
            while segs and segs[0] in ("super", "self"):
                if segs[0] == "super":
                    base = base[:-1]
                segs = segs[1:]
            rest = segs
        else:
            continue  # an external crate, or a child/item in scope: not a cross-module path
        target = base
        for s in rest:
            if target + (s,) in modules:
                target = target + (s,)
            else:
                break
        k = 0
        while k < min(len(here), len(target)) and here[k] == target[k]:
            k += 1
        if k == len(here) or k == len(target):
            continue  # ancestor or descendant
        a, b = here[: k + 1], target[: k + 1]
        edges.setdefault(a, set()).add(b)

    # Tarjan's strongly connected components.
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    name = lambda m: "::".join(m) or "crate"
    if "--edges" in sys.argv:
        for a in sorted(edges):
            print(f"{name(a)} -> {', '.join(sorted(name(b) for b in edges[a]))}")
    for comp in sccs:
        members = set(comp)
        pairs = sorted(f"{name(a)} -> {name(b)}" for a in comp for b in edges.get(a, ()) if b in members)
        print("cycle: " + ", ".join(sorted(name(m) for m in comp)))
        for p in pairs:
            print("   " + p)
    if sccs:
        sys.exit(1)
    print(f"no import cycles among {len(modules)} modules")


if __name__ == "__main__":
    main()
