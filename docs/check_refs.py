#!/usr/bin/env python3
"""Check the documentation's references (make docs-check, in CI).

1. Every backquoted moe.h name in docs/TOUR.md (`moe_...`, `moe__...`,
   `MOE_...`) is defined or declared in moe.h: the tour cites code by name,
   never by line, so moving code does not break it, and renaming code does
   not pass unnoticed.
2. Every citation of a section of docs/ROUTING.md in the files git tracks,
   written ROUTING.md, "Title" or ROUTING.md: "Title", "Other" (also as
   docs/ROUTING.md, or a Markdown link), and in tests/test_spec*.c each
   comment that opens with "Title", names a "## Title" of docs/ROUTING.md.

    python3 docs/check_refs.py    exit 1 and list the broken references
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
        return f.read()


def main():
    header = read("moe.h")
    defined = set(re.findall(r"\b((?:moe|MOE)_\w+)\s*\(", header))        # functions, macros
    defined |= set(re.findall(r"(?:struct|enum)\s+(moe_\w+)", header))       # tags
    defined |= set(re.findall(r"}\s*(moe_\w+)\s*;", header))                  # typedef names
    defined |= set(re.findall(r"^\s*(MOE_\w+)\s*[=,]", header, re.M))        # enumerators
    defined |= set(re.findall(r"#\s*define\s+(MOE_?\w+)", header))          # macros
    defined |= {"MOE_STATUS_" + n for n in re.findall(r"^\s*X\((\w+),", header, re.M)}
    broken = []
    tour = read("docs/TOUR.md")
    for m in re.finditer(r"`((?:moe|MOE)_\w+)", tour):
        if m.group(1) not in defined:
            line = tour.count("\n", 0, m.start()) + 1
            broken.append(f"docs/TOUR.md:{line}: `{m.group(1)}` is not in moe.h")

    sections = set(re.findall(r"^## (.+?)\s*$", read("docs/ROUTING.md"), re.M))
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    cited = 0
    for path in files:
        if (path.endswith((".svg", ".bin", ".png")) or path == "docs/check_refs.py" or
                not os.path.isfile(os.path.join(ROOT, path))):
            continue
        text = read(path)
        quoted = []   # (offset, title) of each section the file cites
        for m in re.finditer(r'ROUTING\.md\)?[,:]?((?:\s*(?:,|and|//|#|\*(?!/))?\s*"[^"]+")+)',
                             text):
            quoted += [(m.start(), q) for q in re.findall(r'"([^"]+)"', m.group(1))]
        if re.match(r"tests/test_spec", path):   # each TEST's comment opens with its section
            quoted += [(m.start(), m.group(1)) for m in re.finditer(r'/\* "([^"]+)"', text)]
        for at, title in quoted:
            cited += 1
            title = " ".join(re.sub(r"\n\s*(//|#|\*)?", " ", title).split())
            if title not in sections:
                line = text.count("\n", 0, at) + 1
                broken.append(f'{path}:{line}: ROUTING.md has no section "{title}"')
    for b in broken:
        print(b)
    if broken:
        return 1
    print(f"docs: every moe.h name in TOUR.md exists; {cited} citations of ROUTING.md sections "
          f"name a section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
