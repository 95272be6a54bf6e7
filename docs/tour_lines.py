#!/usr/bin/env python3
"""Keep docs/TOUR.md's line references into moe.h current.

Every reference is written `name` ... (moe.h:N) or (`name`, moe.h:N) (in a
code block: (name, moe.h:N)): the backquoted identifier nearest before
"moe.h:N" (within 80 characters) names a function, type or macro of moe.h,
and N is the line where it is defined.

    python3 docs/tour_lines.py          rewrite the numbers in place
    python3 docs/tour_lines.py --check  exit 1 if any number is stale or a
                                        reference names nothing (make tour-check)
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "moe.h")
TOUR = os.path.join(ROOT, "docs", "TOUR.md")


def definitions(lines):
    """name -> 1-based line of its definition (functions: in the implementation)."""
    impl = next(i for i, l in enumerate(lines) if l.startswith("#ifdef MOE_IMPLEMENTATION"))
    found = {}
    fn = re.compile(r"^(?:static|MOEDEF|MOE__INLINE)\b[^;(]*?\b([A-Za-z_]\w*)\(")
    for i, l in enumerate(lines):
        m = fn.match(l)
        if m and i > impl:
            found.setdefault(m.group(1), i + 1)
        m = re.match(r"^typedef (?:struct|enum) (\w+)", l)
        if m:
            found.setdefault(m.group(1), i + 1)
        m = re.match(r"^#\s*define (\w+)", l)
        if m:
            found.setdefault(m.group(1), i + 1)
    return found


def main():
    check = "--check" in sys.argv[1:]
    with open(HEADER) as f:
        defs = definitions(f.read().split("\n"))
    with open(TOUR) as f:
        text = f.read()
    out, pos, stale, orphans = [], 0, [], []
    for m in re.finditer(r"moe\.h:(\d+)", text):
        before = text[max(0, m.start() - 80):m.start()]
        names = re.findall(r"`([A-Za-z_]\w*)`|\b(moe_\w+), $", before)
        names = [a or b for a, b in names]
        name = next((n for n in reversed(names) if n in defs), None)
        line_no = text.count("\n", 0, m.start()) + 1
        if name is None:
            orphans.append(f"TOUR.md:{line_no}: moe.h:{m.group(1)} names no moe.h definition before it")
            continue
        want = defs[name]
        if int(m.group(1)) != want:
            stale.append(f"TOUR.md:{line_no}: `{name}` is at moe.h:{want}, not {m.group(1)}")
            out.append(text[pos:m.start()] + f"moe.h:{want}")
            pos = m.end()
    out.append(text[pos:])
    for msg in orphans + stale:
        print(msg)
    if check:
        if orphans or stale:
            print("docs/TOUR.md line references are out of date: run python3 docs/tour_lines.py")
            return 1
        print("docs/TOUR.md: every moe.h line reference is current")
        return 0
    with open(TOUR, "w") as f:
        f.write("".join(out))
    print(f"docs/TOUR.md: {len(stale)} reference(s) updated, {len(orphans)} without a name")
    return 1 if orphans else 0


if __name__ == "__main__":
    sys.exit(main())
