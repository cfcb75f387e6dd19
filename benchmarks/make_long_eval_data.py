"""Builds ``benchmarks/data/long_eval_docs.tar.xz``: the long documents of the real long-prefix
evaluation (``vllm_longspec.train.long_eval``), small enough to travel with the repository.

    SP=/path/to/site-packages
    python benchmarks/make_long_eval_data.py --longtexts ../shared/data/longtexts.tar.xz \
        --code-package $SP/jinja2 --code-package $SP/click --code-package $SP/rich

Each document is the beginning of one source, cut at a line end after ``--chars`` characters
(180,000 for prose: >= 40k tokens with a 150k-token BPE vocabulary, enough for 32k-token
windows plus their labels):
  * prose/*.txt  every file of the longtexts tarball (six Austen novels, Shakespeare, the Debian
    reference);
  * code/<package>.py  one Python package's source files concatenated in path order, each after
    a ``# ==== <package>/<path> ====`` line (a repository-level long code document, as in
    ProLong's ``thestack concat_by_repo``; none of these packages is in the Python standard
    library the draft is trained on).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data", "long_eval_docs.tar.xz")


def cut(text: str, chars: int) -> str:
    """`text` up to the first line end at or after `chars` characters."""
    if len(text) <= chars:
        return text
    end = text.find("\n", chars)
    return text if end < 0 else text[: end + 1]


def prose_documents(tarball: str, chars: int) -> list[tuple[str, str]]:
    docs = []
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.isfile():
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            docs.append((f"prose/{os.path.basename(member.name)}", cut(text, chars)))
    return docs


def code_document(package_dir: str, chars: int) -> tuple[str, str]:
    package = os.path.basename(os.path.normpath(package_dir))
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(package_dir)
                   for name in names if name.endswith(".py"))
    parts, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            body = f.read()
        rel = os.path.relpath(path, os.path.dirname(os.path.normpath(package_dir)))
        part = f"# ==== {rel} ====\n{body}" + ("" if body.endswith("\n") else "\n")
        parts.append(part)
        total += len(part)
        if total >= chars:
            break
    return f"code/{package}.py", cut("".join(parts), chars)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--longtexts", required=True, help="longtexts.tar.xz")
    p.add_argument("--code-package", action="append", default=[], metavar="DIR",
                   help="a Python package folder (repeatable)")
    p.add_argument("--chars", type=int, default=180_000, help="characters per prose document")
    p.add_argument("--code-chars", type=int, default=200_000,
                   help="characters per code document (code tokenizes denser)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    docs = prose_documents(args.longtexts, args.chars)
    docs += [code_document(d, args.code_chars) for d in args.code_package]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tarfile.open(args.out, "w:xz", preset=9) as tar:
        for name, text in docs:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
            print(f"{name:<34}{len(text):>9} chars")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
