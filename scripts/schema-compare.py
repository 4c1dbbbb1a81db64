#!/usr/bin/env python3
"""Compare the schema the old migrations built with the one `migrations/` builds now.

Builds two in-memory SQLite databases: one by running, in order, the migrations of an old
commit (read with `git show COMMIT:migrations/FILE`), one by running the migrations of the
work tree (or of another commit). Compares, read through `sqlite_schema` and the pragmas:
- tables (and whether each is WITHOUT ROWID),
- columns: name, declared type, NOT NULL, default, primary-key position (`pragma_table_info`),
- foreign keys (`pragma_foreign_key_list`),
- indexes, named and automatic (`pragma_index_list`), with their columns (`pragma_index_info`);
  an automatic index (of a UNIQUE or PRIMARY KEY constraint) is compared by its table and
  columns, since its name follows the order of constraints,
- triggers, by name and text.
Prints every difference, then whether they are exactly the columns dropped as dead when the
migrations were folded into one schema. Exits 0 when they are, 1 otherwise.

    python3 scripts/schema-compare.py                  # 5ca0d65 against the work tree
    python3 scripts/schema-compare.py --old a673d1d    # another old commit
    python3 scripts/schema-compare.py --new HEAD       # the migrations of a commit
"""
import argparse
import os
import re
import sqlite3
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Columns the old migrations left unused and the folded schema leaves out.
DEAD = {
    ("quotas", "reserved"),
    ("quotas", "last_pick"),
    ("reservations", "settle_input"),
    ("reservations", "settle_output"),
    ("reservations", "settle_unreported"),
    ("reservations", "settled_at"),
    ("credentials", "last_used_at"),
}


def git(*args):
    return subprocess.run(
        ["git", "-C", REPO, *args], check=True, capture_output=True, text=True
    ).stdout


def migrations_at(commit):
    """The migrations of `commit` (None: the work tree), as (file name, SQL) in version order."""
    if commit is None:
        folder = os.path.join(REPO, "migrations")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".sql"))
        return [(n, open(os.path.join(folder, n), encoding="utf-8").read()) for n in names]
    names = sorted(
        os.path.basename(p)
        for p in git("ls-tree", "--name-only", f"{commit}:migrations").split()
        if p.endswith(".sql")
    )
    return [(n, git("show", f"{commit}:migrations/{n}")) for n in names]


def build(migrations):
    db = sqlite3.connect(":memory:")
    for name, sql in migrations:
        try:
            db.executescript(sql)
        except sqlite3.Error as e:
            sys.exit(f"{name}: {e}")
    return db


def schema(db):
    """Everything compared, as a set of hashable facts (kind, table, ...)."""
    facts = set()
    q = lambda sql, *args: db.execute(sql, args).fetchall()
    tables = [
        (name, sql)
        for name, sql in q(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    for table, sql in tables:
        rowid = not re.search(r"\)\s*WITHOUT\s+ROWID\s*;?\s*$", sql, re.I)
        facts.add(("table", table, "rowid" if rowid else "WITHOUT ROWID"))
        for name, ctype, notnull, default, pk in q(
            "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?)", table
        ):
            facts.add(("column", table, name, ctype, bool(notnull), default, pk))
        for _, seq, parent, frm, to, on_update, on_delete, match in q(
            "SELECT * FROM pragma_foreign_key_list(?)", table
        ):
            facts.add(("foreign key", table, frm, parent, to, on_update, on_delete))
        for _, name, unique, origin, partial in q(
            "SELECT seq, name, \"unique\", origin, partial FROM pragma_index_list(?)", table
        ):
            cols = tuple(c for (c,) in q("SELECT name FROM pragma_index_info(?) ORDER BY seqno", name))
            label = name if origin == "c" else f"(automatic, {origin})"
            facts.add(("index", table, label, cols, bool(unique), bool(partial)))
    for name, table, sql in q("SELECT name, tbl_name, sql FROM sqlite_schema WHERE type = 'trigger'"):
        facts.add(("trigger", table, name, " ".join(sql.split())))
    return facts


def show(fact):
    kind, table, *rest = fact
    if kind == "column":
        name, ctype, notnull, default, pk = rest
        return (f"column {table}.{name} {ctype}{' NOT NULL' if notnull else ''}"
                f"{f' DEFAULT {default}' if default is not None else ''}{f' pk {pk}' if pk else ''}")
    if kind == "index":
        name, cols, unique, partial = rest
        return (f"index {name} on {table} ({', '.join(cols)})"
                f"{' unique' if unique else ''}{' partial' if partial else ''}")
    return f"{kind} {table} " + " ".join(str(r) for r in rest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="5ca0d65", help="commit with the old migrations")
    ap.add_argument("--new", default=None, help="commit with the new ones (default: work tree)")
    args = ap.parse_args()
    old_migrations = migrations_at(args.old)
    new_migrations = migrations_at(args.new)
    old, new = schema(build(old_migrations)), schema(build(new_migrations))
    print(f"old: {len(old_migrations)} migrations at {args.old}; "
          f"new: {len(new_migrations)} migrations in {args.new or 'the work tree'}")
    only_old, only_new = sorted(old - new, key=str), sorted(new - old, key=str)
    for f in only_old:
        print(f"- only in old: {show(f)}")
    for f in only_new:
        print(f"+ only in new: {show(f)}")
    if not only_old and not only_new:
        print("no difference")
    dropped = {(f[1], f[2]) for f in only_old if f[0] == "column"}
    expected = not only_new and all(f[0] == "column" for f in only_old) and dropped == DEAD
    print(
        "the differences are exactly the dead columns"
        if expected
        else "the differences are NOT exactly the dead columns: "
        + ", ".join(f"{t}.{c}" for t, c in sorted(DEAD))
    )
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
