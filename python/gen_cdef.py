#!/usr/bin/env python3
"""Derive the cffi declarations of the Python package from moe.h.

The public part of moe.h (between its `extern "C" {` and the closing brace)
is what cffi needs, minus what its C parser does not take: comments,
preprocessor lines and the MOEDEF linkage macro. The status enum is written
by an X-macro; its entries are expanded here from MOE__STATUS_LIST.

    python3 python/gen_cdef.py           rewrite python/moe/_cdef.h
    python3 python/gen_cdef.py --check   exit 1 if _cdef.h is not what moe.h gives

Standard library only: the check runs before anything is installed.
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "..", "moe.h")
OUTPUT = os.path.join(HERE, "moe", "_cdef.h")

BANNER = ("/* Generated from moe.h by python/gen_cdef.py: do not edit.\n"
          "   The cffi declarations of the public API (make python-cdef-check). */\n")

# strings first, so a "/*" inside one is not taken for a comment
_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|/\*.*?\*/|//[^\n]*', re.S)


def _strip_comments(text):
    return _TOKENS.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " ", text)


def _status_entries(header):
    """X(NAME, value, "text") entries of MOE__STATUS_LIST, in order."""
    m = re.search(r"#define MOE__STATUS_LIST\(X\)((?:[^\n]*\\\n)*[^\n]*\n)", header)
    if not m:
        raise SystemExit("gen_cdef: MOE__STATUS_LIST not found in moe.h")
    body = _strip_comments(m.group(1))
    entries = re.findall(r"\bX\(\s*([A-Z_0-9]+)\s*,\s*(\d+)\s*,", body)
    if not entries:
        raise SystemExit("gen_cdef: MOE__STATUS_LIST has no X(...) entries")
    return entries


def _public_part(header):
    begin = re.search(r'#ifdef __cplusplus\s*\nextern "C" \{\s*\n#endif\s*\n', header)
    end = re.search(r'#ifdef __cplusplus\s*\n\}\s*\n#endif\s*\n#endif /\* MOE_H_INCLUDED \*/',
                    header)
    if not begin or not end or end.start() < begin.end():
        raise SystemExit('gen_cdef: the extern "C" block of moe.h was not found')
    return header[begin.end():end.start()]


def generate(header):
    version = [re.search(r"#define (MOE_VERSION_%s) (\d+)" % part, header)
               for part in ("MAJOR", "MINOR", "PATCH")]
    if not all(version):
        raise SystemExit("gen_cdef: MOE_VERSION_MAJOR/MINOR/PATCH not found in moe.h")
    body = _public_part(header)
    statuses = "".join("    MOE_STATUS_%s = %s,\n" % e for e in _status_entries(header))
    # the X-macro's use inside enum moe_status becomes its expansion
    body = re.sub(r"^[ \t]*MOE__STATUS_LIST\(MOE__X\)[ \t]*$", lambda _: statuses.rstrip("\n"),
                  body, flags=re.M)
    body = _strip_comments(body)
    # preprocessor lines, with their continuations (the X-macro's definition)
    body = re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*$", "", body, flags=re.M)
    body = re.sub(r"\bMOEDEF\s+", "", body)
    lines = [line.rstrip() for line in body.split("\n")]
    out, blank = [], True
    for line in lines:          # one blank line between declarations, none inside braces' edges
        if not line.strip():
            blank = True
            continue
        if blank and out and not out[-1].endswith("{") and not line.lstrip().startswith("}"):
            out.append("")
        out.append(line)
        blank = False
    defines = "".join("#define %s %s\n" % (v.group(1), v.group(2)) for v in version)
    return BANNER + "\n" + defines + "\n" + "\n".join(out).rstrip("\n") + "\n"


def main(argv):
    check = "--check" in argv[1:]
    unknown = [a for a in argv[1:] if a != "--check"]
    if unknown:
        raise SystemExit("usage: gen_cdef.py [--check]")
    with open(HEADER, encoding="utf-8") as f:
        text = generate(f.read())
    if check:
        try:
            with open(OUTPUT, encoding="utf-8") as f:
                old = f.read()
        except FileNotFoundError:
            old = None
        if old != text:
            print("python/moe/_cdef.h is not what moe.h gives: run python3 python/gen_cdef.py "
                  "and commit the result", file=sys.stderr)
            return 1
        print("python/moe/_cdef.h matches moe.h")
        return 0
    with open(OUTPUT, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print("wrote python/moe/_cdef.h")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
